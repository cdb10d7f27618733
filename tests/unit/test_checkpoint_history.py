"""checkpoint.keep_every_steps: every N-th step kept as checkpoints/step-<N>/, verified like latest, never rotated.

The checkpointer saves for real (world size 1, in this process); the sharded case writes real DCP files
through a gloo process group of one.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import TINY

from prefix.checkpoint import Checkpointer, choose, history, sharded
from prefix.checkpoint.resume import verify_save
from prefix.config import CheckpointConfig, ConfigError, load
from prefix.distributed import World
from prefix.errors import UserError


class Crash(Exception):
    pass


def checkpointer(folder: Path, keep: int = 2, sharded_saves: bool = False) -> Checkpointer:
    return Checkpointer(folder, World(), CheckpointConfig(keep_every_steps=keep), sharded_saves=sharded_saves)


def state(step: int):
    return lambda: {"marker": torch.full((4,), float(step)), "weights": torch.ones(1000)}


def save(ck: Checkpointer, step: int) -> None:
    assert ck.save(step, state(step), {"marker": step}).error is None
    for thread in threading.enumerate():
        if thread.name == "checkpoint-cleanup":
            thread.join()


def marker(folder: Path) -> int:
    return int(torch.load(folder / "latest.pt", weights_only=True)["marker"][0])


@pytest.fixture
def saved(tmp_path) -> Path:
    """Saves at steps 1..10, every second one kept."""
    ck = checkpointer(tmp_path)
    for step in range(1, 11):
        save(ck, step)
    return tmp_path


def test_every_nth_step_is_kept_verified_and_left_by_rotation(saved):
    assert history.kept(saved) == [2, 4, 6, 8, 10]
    assert sorted(p.name for p in saved.glob("step-*")) == ["step-10", "step-2", "step-4", "step-6", "step-8"]
    for step in history.kept(saved):
        folder = saved / f"step-{step}"
        assert verify_save(folder) == [], step
        assert marker(folder) == step and torch.load(folder / "latest_rank0.pt", weights_only=True)["marker"] == step
        assert len(list(folder.glob("manifest-*.json"))) == 1
        assert history.verified(saved, step) == folder
    # Rotation moved on (latest 10, prev 9, their manifests only) and left every kept step whole.
    assert sorted(int(p.name.split("-")[1]) for p in saved.glob("manifest-*.json")) == [9, 10]
    assert (marker(saved), torch.load(saved / "prev.pt", weights_only=True)["step"]) == (10, 9)
    assert choose(saved, 1)[0].step == 10, "history is not a resume point"
    # Hard links: the newest kept step is the very file latest.pt is, not a copy.
    assert os.path.samefile(saved / "step-10" / "latest.pt", saved / "latest.pt")


def test_a_damaged_file_of_a_kept_step_is_named(saved):
    path = saved / "step-4" / "latest.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    (problem,) = verify_save(saved / "step-4")
    assert problem.file == "latest.pt" and "XXH3-128 does not match" in problem.reason
    with pytest.raises(UserError, match=r"step-4: latest\.pt: damaged: its XXH3-128 does not match") as e:
        history.verified(saved, 4)
    assert "\n" not in str(e.value) and "2, 6, 8, 10" in str(e.value)
    (saved / "step-6" / "latest_rank0.pt").unlink()
    with pytest.raises(UserError, match=r"step-6: latest_rank0\.pt: missing"):
        history.verified(saved, 6)
    assert history.verified(saved, 8) == saved / "step-8"


def test_a_step_that_was_not_kept_is_an_error_listing_the_kept_ones(saved, tmp_path_factory):
    with pytest.raises(UserError, match=r"step 5 was not kept \(kept steps: 2, 4, 6, 8, 10\)"):
        history.verified(saved, 5)
    with pytest.raises(UserError, match=r"step 2 was not kept \(kept steps: none\)"):
        history.verified(tmp_path_factory.mktemp("empty"), 2)


def test_a_leftover_temporary_history_folder_is_removed_at_start_and_kept_steps_stay(saved):
    leftover = saved / "step-12.e3.tmp"
    (leftover / "sharded-12-ab").mkdir(parents=True)
    (leftover / "latest.pt").write_bytes(b"half")
    (leftover / "sharded-12-ab" / "__0_0.distcp").write_bytes(b"half")
    checkpointer(saved).clean_temporary()
    assert not leftover.exists()
    assert history.kept(saved) == [2, 4, 6, 8, 10] and all(verify_save(saved / f"step-{s}") == [] for s in (2, 10))


def test_a_crash_before_the_rename_leaves_no_kept_step_and_the_next_start_cleans_up(tmp_path, monkeypatch):
    ck = checkpointer(tmp_path)
    save(ck, 2)
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == "step-4":
            raise Crash
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Crash):
        ck.save(4, state(4), {"marker": 4})
    assert history.kept(tmp_path) == [2], "a half-built step must never look kept"
    assert [p.name for p in tmp_path.glob("step-4*")] == ["step-4.e0.tmp"]
    monkeypatch.undo()
    checkpointer(tmp_path).clean_temporary()
    assert not list(tmp_path.glob("step-4*")) and choose(tmp_path, 1)[0].step == 4


def test_without_hard_links_the_files_are_copied(tmp_path, monkeypatch):
    def no_links(*_):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    ck = checkpointer(tmp_path)
    save(ck, 2)
    assert verify_save(tmp_path / "step-2") == [] and marker(tmp_path / "step-2") == 2
    assert not os.path.samefile(tmp_path / "step-2" / "latest.pt", tmp_path / "latest.pt")


def test_a_step_is_redone_after_a_fallback_replaces_the_kept_one(saved):
    ck = checkpointer(saved)
    ck.committed_step, ck._slot_global, ck._slot_rank = 9, "prev", "prev"  # as after a resume from prev.pt
    save(ck, 10)
    assert history.kept(saved) == [2, 4, 6, 8, 10] and verify_save(saved / "step-10") == []
    assert os.path.samefile(saved / "step-10" / "latest.pt", saved / "latest.pt"), "the redone save's files"
    assert not list(saved.glob("*.tmp"))


def test_kept_steps_are_saved_whatever_the_other_intervals(tmp_path):
    ck = Checkpointer(tmp_path, World(), CheckpointConfig(every_steps=3, keep_every_steps=5))
    assert [s for s in range(1, 16) if ck.steps_due(s)] == [3, 5, 6, 9, 10, 12, 15]
    off = Checkpointer(tmp_path, World(), CheckpointConfig(every_steps=3))
    assert [s for s in range(1, 11) if off.steps_due(s)] == [3, 6, 9]


def test_a_negative_keep_every_steps_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint.keep_every_steps: must be 0 \\(off\\) or positive"):
        load(TINY, ["checkpoint.keep_every_steps=-1"])


# -- sharded (trainer.parallelism: fsdp) --------------------------------------------------------

@pytest.fixture
def group():
    """A process group of one (DCP's collectives, the checkpointer's own gloo group)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_kept_sharded_step_holds_its_folder_verifies_and_reads_after_rotation(tmp_path, group):
    ck = checkpointer(tmp_path, keep=2, sharded_saves=True)
    for step in (2, 3, 4, 5):
        shards = {"model": {"w": torch.full((500,), float(step))}, "optimizer": {"m": torch.full((3,), -step)}}
        assert ck.save(step, lambda s=step: {"marker": s}, {"marker": step}, shards=lambda s=shards: s).error is None
    for thread in threading.enumerate():
        if thread.name == "checkpoint-cleanup":
            thread.join()
    assert history.kept(tmp_path) == [2, 4]
    assert sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("sharded-*")) == [4, 5], "rotation went on"
    folder = tmp_path / "step-2"
    (shard_folder,) = folder.glob("sharded-2-*")
    assert verify_save(folder) == []
    target = {"model": {"w": torch.zeros(500)}}
    sharded.read(shard_folder, target)
    assert torch.equal(target["model"]["w"], torch.full((500,), 2.0))
    (shard_folder / "__0_0.distcp").write_bytes(b"damaged")
    (problem,) = verify_save(folder)
    assert problem.file == "latest.pt" and "__0_0.distcp is damaged" in problem.reason
