"""Sharded checkpoints (trainer.parallelism=fsdp) keep every promise of the plain ones.

DCP writes real shard files through a real gloo process group of one rank, in this process; a crash
is injected before each file operation of the commit, shard files are damaged, a crafted `.metadata`
is planted, and a small disk fills up. What is on disk must always resume one consistent step.
"""

from __future__ import annotations

import os
import pickle
import shutil
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import RunsCode

from prefix.checkpoint import Checkpointer, NoUsableCheckpoint, checksums, choose, files, sharded
from prefix.config import CheckpointConfig
from prefix.distributed import World


class Crash(Exception):
    pass


@pytest.fixture(autouse=True, scope="module")
def group():
    """A process group of one (DCP's collectives, the checkpointer's own gloo group)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def checkpointer(folder: Path) -> Checkpointer:
    return Checkpointer(folder, World(), CheckpointConfig(), sharded_saves=True)


def shards(step: int):
    return lambda: {"model": {"w": torch.full((2000,), float(step))}, "optimizer": {"m": torch.full((7,), -step)}}


def global_state(step: int):
    return lambda: {"marker": step}


def write(ck: Checkpointer, step: int) -> None:
    """Phases 1 and 2 of a save (what a kill before the commit leaves)."""
    ck._name_shards(step, shards(step))
    sums = ck.write(step, global_state(step), {"marker": step}, shards(step)())
    ck.record(step, [sums])


def save(ck: Checkpointer, step: int) -> None:
    assert ck.save(step, global_state(step), {"marker": step}, shards=shards(step)).error is None
    cleaned_up()


def cleaned_up() -> None:
    for thread in threading.enumerate():
        if thread.name == "checkpoint-cleanup":
            thread.join()


def resume(folder: Path, unusable: tuple[str, ...] = ()) -> int:
    """What a restart does: choose a step, load its files and its whole sharded folder; they agree."""
    choice, findings = choose(folder, 1)
    assert sorted(f.file for f in findings if f.unusable) == sorted(unusable), findings
    assert choice is not None, sorted(os.listdir(folder))
    ck = checkpointer(folder)
    state, rank_state = ck.load(choice)
    assert state["step"] == rank_state["step"] == state["marker"] == choice.step
    target = {"model": {"w": torch.zeros(2000)}, "optimizer": {"m": torch.zeros(7)}}
    ck.read_shards(state["sharded"], target)
    assert torch.equal(target["model"]["w"], torch.full((2000,), float(choice.step)))
    assert torch.equal(target["optimizer"]["m"], torch.full((7,), -float(choice.step)))
    return choice.step


def folders(root: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in root.glob("sharded-*"))


def test_each_save_writes_a_fresh_folder_and_only_the_kept_ones_stay(tmp_path):
    ck = checkpointer(tmp_path)
    for step in (10, 20, 30):
        save(ck, step)
    assert folders(tmp_path) == [20, 30]  # latest and prev; 10's went with its manifest
    (manifest,) = [m for m in files.read_manifests(tmp_path)[0] if m.step == 30]
    latest = torch.load(tmp_path / "latest.pt", weights_only=True)["sharded"]
    assert sorted(sharded.listed(manifest.files, latest)) == [".metadata", "__0_0.distcp"]
    assert resume(tmp_path) == 30


def crash_after(monkeypatch, budget: int) -> None:
    """Let `budget` renames/unlinks/folder removals happen, then crash, as SIGKILL between two would."""
    calls = {"n": 0}

    def guard(real, in_thread=False):
        def op(*args, **kwargs):
            if kwargs.get("dir_fd") is not None:  # inside the folder removal, counted as one operation
                return real(*args, **kwargs)
            if calls["n"] >= budget:
                if in_thread:  # the removal runs in a thread of its own: the kill lands before it
                    return None
                raise Crash
            calls["n"] += 1
            return real(*args, **kwargs)
        return op

    monkeypatch.setattr(os, "replace", guard(os.replace))
    monkeypatch.setattr(os, "unlink", guard(os.unlink))
    monkeypatch.setattr(sharded, "remove", guard(sharded.remove, in_thread=True))


COMMIT_OPS = 6  # 2 renames per file (rank and global), 1 manifest pruned, 1 folder removed


@pytest.mark.parametrize("budget", range(COMMIT_OPS + 1))
def test_crash_at_every_point_of_a_sharded_commit_resumes_consistently(tmp_path, monkeypatch, budget):
    ck = checkpointer(tmp_path)
    save(ck, 10)
    save(ck, 20)
    write(ck, 30)
    with monkeypatch.context() as m:
        crash_after(m, budget)
        try:
            ck.commit(30)
            ck.prune(30)
            cleaned_up()
        except Crash:
            pass
    step = resume(tmp_path)
    assert step == (30 if budget >= COMMIT_OPS - 2 else 20)
    restarted = checkpointer(tmp_path)
    restarted.load(choose(tmp_path, 1)[0])
    restarted.clean_temporary()  # the next start drops what no manifest lists
    cleaned_up()
    assert set(folders(tmp_path)) <= {10, 20, 30} and step in folders(tmp_path)
    save(restarted, step + 5)
    assert resume(tmp_path) == step + 5 and folders(tmp_path) == [step, step + 5]


def test_a_folder_written_before_a_kill_is_removed_at_the_next_start(tmp_path):
    ck = checkpointer(tmp_path)
    save(ck, 10)
    ck._name_shards(20, shards(20))
    ck.write(20, global_state(20), {"marker": 20}, shards(20)())  # killed before rank 0 recorded the manifest
    assert folders(tmp_path) == [10, 20]
    checkpointer(tmp_path).clean_temporary()
    cleaned_up()
    assert folders(tmp_path) == [10] and resume(tmp_path) == 10


def latest_folder(root: Path) -> Path:
    return root / torch.load(root / "latest.pt", weights_only=True)["sharded"]


@pytest.mark.parametrize("damage", ["bit flip", "truncated", "missing"])
@pytest.mark.parametrize("file", ["__0_0.distcp", ".metadata"])
def test_a_damaged_or_missing_shard_file_falls_back_to_the_previous_step(tmp_path, damage, file):
    ck = checkpointer(tmp_path)
    save(ck, 10)
    save(ck, 20)
    path = latest_folder(tmp_path) / file
    data = bytearray(path.read_bytes())
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    choice, findings = choose(tmp_path, 1)
    assert (choice.step, choice.global_slot) == (10, "prev")
    (finding,) = [f for f in findings if f.unusable]
    assert finding.file == "latest.pt" and file in finding.reason
    assert ("missing" if damage == "missing" else "XXH3-128 does not match") in finding.reason
    assert resume(tmp_path, unusable=("latest.pt",)) == 10


def test_a_crafted_metadata_is_refused_even_when_its_checksum_is_recorded(tmp_path):
    ck = checkpointer(tmp_path)
    save(ck, 10)
    marker = tmp_path.parent / f"{tmp_path.name}-pwned"
    folder = latest_folder(tmp_path)
    (folder / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))  # DCP itself would pickle.load it
    # The attacker rewrites the manifest too: only the restricted unpickler stands in the way.
    (manifest,) = files.read_manifests(tmp_path)[0]
    forged = {**manifest.files, sharded.role(folder.name, ".metadata"): checksums.file_sum(folder / ".metadata")}
    os.unlink(tmp_path / manifest.name)
    files.write_manifest(tmp_path, 10, 1, forged)
    with pytest.raises(NoUsableCheckpoint) as e:
        choose(tmp_path, 1)
    assert ".metadata refused" in str(e.value) and "system" in str(e.value)
    with pytest.raises(Exception, match="never holds"):
        sharded.Reader(folder).read_metadata()
    assert not marker.exists()


def test_nothing_usable_is_an_error_and_changes_nothing(tmp_path):
    ck = checkpointer(tmp_path)
    save(ck, 10)
    save(ck, 20)
    for path in tmp_path.glob("sharded-*/__0_0.distcp"):
        path.write_bytes(path.read_bytes()[:-10])
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    with pytest.raises(NoUsableCheckpoint) as e:
        choose(tmp_path, 1)
    assert "latest.pt: " in str(e.value) and "prev.pt: " in str(e.value) and "\n" not in str(e.value)
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == before


@pytest.fixture
def small_disk(tmp_path, tmpfs):
    """Room for two sharded checkpoints of the size below, not for a third during its write."""
    tmpfs(tmp_path / "disk", 200)
    return tmp_path / "disk" / "checkpoints"


def test_a_sharded_save_that_fills_the_disk_fails_cleanly_and_keeps_the_last_checkpoint(small_disk):
    ck = checkpointer(small_disk)

    def big(step):
        return lambda: {"model": {"w": torch.full((12_000,), float(step))}}  # 48 KB of shards

    for step in (10, 20):
        assert ck.save(step, global_state(step), {"marker": step}, shards=big(step)).error is None
        cleaned_up()
    failed = ck.save(30, global_state(30), {"marker": 30}, shards=big(30))
    assert failed.error and "No space left on device" in failed.error
    cleaned_up()
    assert ck.committed_step == 20 and folders(small_disk) == [10, 20], "the failed save's folder is removed"
    assert not list(small_disk.glob("*.tmp"))
    choice, findings = choose(small_disk, 1)
    assert (choice.step, findings) == (20, [])
    shutil.rmtree(small_disk / torch.load(small_disk / "prev.pt", weights_only=True)["sharded"])
    (small_disk / "prev.pt").unlink()  # space comes back: the next save succeeds
    assert ck.save(40, global_state(40), {"marker": 40}, shards=big(40)).error is None
    assert choose(small_disk, 1)[0].step == 40
