"""A periodic save due while the previous write is in flight is skipped, never waited for; the final save never is.

The writer is held in its write by a gate, so that "still writing" is certain rather than a race; the
boundaries are driven by hand with the policy (`Boundary`), as the trainer's loop drives them.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from prefix.checkpoint import Checkpointer, choose, files
from prefix.checkpoint.policy import Boundary, Save
from prefix.config import CheckpointConfig
from prefix.distributed import World


def state(step: int):
    return lambda: {"marker": torch.full((4,), float(step))}


@pytest.fixture
def gated(monkeypatch):
    """Background writes wait for `gate` before writing (synchronous saves go through)."""
    gate, real = threading.Event(), files.write_durably

    def write_durably(obj, path, *args):
        if threading.current_thread().name == "checkpoint-write":
            assert gate.wait(30), "the test never opened the gate"
        return real(obj, path, *args)

    monkeypatch.setattr(files, "write_durably", write_durably)
    yield gate
    gate.set()


def boundary(ck: Checkpointer, step: int, **flags) -> Boundary:
    """The boundary after `step` steps as this rank alone sees it (every step is due: every_steps 1)."""
    return Boundary(**{"step": step, "max_steps": 100, "stop": False, "time_due": False, "writing": ck.busy,
                       "steps_due": True, "in_flight": ck.in_flight, "committed": ck.committed_step,
                       "owed": ck.owed, **flags})


def wait_written(ck: Checkpointer) -> None:
    while ck.busy:
        threading.Event().wait(0.01)


def test_a_skipped_save_leaves_the_last_committed_step_as_the_resume_point(tmp_path: Path, gated) -> None:
    ck = Checkpointer(tmp_path, World(), CheckpointConfig(every_steps=1))
    assert ck.save(10, state(10), {"rng": 10}).error is None
    ck.start(11, state(11), {"rng": 11})
    for step in (12, 13):
        at = boundary(ck, step)
        assert not at.commit() and at.skip() and at.save() is None, "the loop goes on: nothing waits"
        ck.skip()
        assert choose(tmp_path, 1)[0].step == 10, "a skipped save changes nothing a resume reads"
    assert ck.owed and ck.busy  # a kill now resumes step 10, as choose() said: the skipped saves wrote nothing
    gated.set()
    wait_written(ck)
    at = boundary(ck, 14, steps_due=False)
    assert at.commit()
    result = ck.finish()
    assert (result.step, result.error, result.skipped, ck.committed_step) == (11, None, 2, 11)
    owed = boundary(ck, 14, steps_due=False)
    assert owed.save() == Save(final=False, background=True), "the skipped save is made at the first chance"
    ck.start(14, state(14), {"rng": 14})
    assert not ck.owed
    wait_written(ck)
    assert ck.finish().skipped == 0 and choose(tmp_path, 1)[0].step == 14


@pytest.mark.parametrize("end", [{"stop": True}, {"step": 100}])
def test_the_final_save_is_never_skipped(tmp_path: Path, gated, end) -> None:
    """A stop (or the end) while a write is in flight commits that write first (waiting for it), then saves."""
    ck = Checkpointer(tmp_path, World(), CheckpointConfig(every_steps=1))
    ck.start(12, state(12), {"rng": 12})
    step = end.get("step", 13)
    at = boundary(ck, **{"step": 13, **end})
    assert at.commit() and not at.skip(), "the write in flight is committed, even while it is still written"
    threading.Timer(0.2, gated.set).start()
    assert ck.finish().error is None and ck.committed_step == 12
    final = boundary(ck, **{"step": 13, **end}).save()
    assert final == Save(final=True, background=False)
    assert ck.save(step, state(step), {"rng": step}, final=True).error is None
    assert choose(tmp_path, 1)[0].step == step


def test_a_failed_write_in_flight_is_reported_with_its_skips_and_the_resume_point_stays(tmp_path: Path,
                                                                                    monkeypatch) -> None:
    ck = Checkpointer(tmp_path, World(), CheckpointConfig(every_steps=1))
    assert ck.save(10, state(10), {"rng": 10}).error is None
    gate = threading.Event()

    def full(obj, path, *args):
        gate.wait(30)
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(files, "write_durably", full)
    ck.start(11, state(11), {"rng": 11})
    assert boundary(ck, 12).skip()
    ck.skip()
    gate.set()
    wait_written(ck)
    result = ck.finish()
    assert "No space left on device" in result.error and result.skipped == 1
    assert ck.committed_step == 10 and choose(tmp_path, 1)[0].step == 10
    assert not list(tmp_path.glob("*.tmp")) and ck.owed, "the next boundary tries again"
