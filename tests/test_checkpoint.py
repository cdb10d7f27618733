"""At any instant of a crash, what is on disk resumes to one consistent step.

The save protocol is driven phase by phase for two ranks in one process (write on every rank,
then commit on every rank: the order the barriers enforce), and a crash is injected before each
single file operation of the commit, and inside the files themselves (truncation).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from prefix.checkpoint import Checkpointer, choose, rng_state, set_rng_state
from prefix.config import CheckpointConfig
from prefix.distributed import World


class Crash(Exception):
    pass


def ranks(folder: Path) -> list[Checkpointer]:
    return [Checkpointer(folder, World(rank=r, world_size=2), CheckpointConfig()) for r in (0, 1)]


def write(cks: list[Checkpointer], step: int) -> None:
    for ck in cks:
        ck.write(step, lambda: {"marker": torch.full((4,), float(step))}, {"marker": step})


def save(cks: list[Checkpointer], step: int, order=(0, 1)) -> None:
    write(cks, step)
    for r in order:
        cks[r].commit()


def resume(folder: Path) -> tuple[int, list[Checkpointer]]:
    """What a restart does: choose, then every rank loads its files; checks they agree."""
    choice, _ = choose(folder, 2)
    assert choice is not None, f"nothing to resume from in {sorted(os.listdir(folder))}"
    cks = ranks(folder)
    for ck in cks:
        state, rank_state = ck.load(choice)
        assert state["step"] == rank_state["step"] == choice.step
        assert torch.equal(state["marker"], torch.full((4,), float(choice.step)))
        assert rank_state["marker"] == choice.step
    return choice.step, cks


def crash_after(monkeypatch, budget: int) -> None:
    """Let `budget` renames/unlinks happen, then crash, as SIGKILL between two of them would."""
    calls = {"n": 0}
    real_replace, real_unlink = os.replace, os.unlink

    def guard(real):
        def op(*args, **kwargs):
            if calls["n"] >= budget:
                raise Crash
            calls["n"] += 1
            return real(*args, **kwargs)
        return op

    monkeypatch.setattr(os, "replace", guard(real_replace))
    monkeypatch.setattr(os, "unlink", guard(real_unlink))


def commit_until_crash(monkeypatch, cks: list[Checkpointer], order, budget: int) -> None:
    """Commit rank by rank in `order`, crashing after `budget` file operations."""
    with monkeypatch.context() as m:
        crash_after(m, budget)
        try:
            for r in order:
                cks[r].commit()
        except Crash:
            pass


COMMIT_OPS = 6  # per save with a previous checkpoint: 2 renames per rank file, 2 for the global file


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
@pytest.mark.parametrize("budget", range(COMMIT_OPS + 1))
def test_crash_at_every_point_of_a_commit_resumes_consistently(tmp_path, monkeypatch, order, budget):
    cks = ranks(tmp_path)
    save(cks, 10)
    save(cks, 20)
    write(cks, 30)
    commit_until_crash(monkeypatch, cks, order, budget)
    step, resumed = resume(tmp_path)
    assert step == (30 if budget == COMMIT_OPS else 20)

    # The restarted run saves again, and crashes again anywhere: still consistent, never older.
    write(resumed, step + 5)
    commit_until_crash(monkeypatch, resumed, order, budget)
    assert resume(tmp_path)[0] in (step, step + 5)


def test_partly_written_temporary_files_are_ignored(tmp_path):
    cks = ranks(tmp_path)
    save(cks, 10)
    write(cks, 20)
    for tmp in tmp_path.glob("*.tmp"):
        tmp.write_bytes(tmp.read_bytes()[: tmp.stat().st_size // 2])
    assert resume(tmp_path)[0] == 10


@pytest.mark.parametrize("damaged", ["latest.pt", "latest_rank1.pt"])
def test_truncated_latest_falls_back_to_previous(tmp_path, damaged):
    cks = ranks(tmp_path)
    save(cks, 10)
    save(cks, 20)
    path = tmp_path / damaged
    path.write_bytes(path.read_bytes()[:100])
    assert resume(tmp_path)[0] == 10


def test_keeps_latest_and_one_previous(tmp_path):
    cks = ranks(tmp_path)
    for step in (10, 20, 30):
        save(cks, step)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest.pt", "latest_rank0.pt", "latest_rank1.pt", "prev.pt", "prev_rank0.pt", "prev_rank1.pt"]
    assert torch.load(tmp_path / "prev.pt", weights_only=True)["step"] == 20


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    import random

    import numpy as np
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.random(), np.random.rand(), torch.rand(1)  # move every stream on
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
