"""At any instant of a crash, what is on disk resumes to one consistent step.

The save protocol is driven phase by phase for two ranks in one process (write on every rank,
rank 0 records the manifest, then commit on every rank and prune: the order the collectives
enforce), and a crash is injected before each single file operation of the commit and prune, and
inside the files themselves (truncation).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch
from helpers import RunsCode

from prefix.checkpoint import Checkpointer, NoUsableCheckpoint, choose, files, rng_state, set_rng_state
from prefix.config import CheckpointConfig
from prefix.distributed import World


class Crash(Exception):
    pass


def ranks(folder: Path) -> list[Checkpointer]:
    return [Checkpointer(folder, World(rank=r, world_size=2), CheckpointConfig()) for r in (0, 1)]


def write(cks: list[Checkpointer], step: int) -> None:
    sums = [ck.write(step, lambda: {"marker": torch.full((4,), float(step))}, {"marker": step}) for ck in cks]
    cks[0].record(step, sums)


def commit(cks: list[Checkpointer], step: int, order=(0, 1)) -> None:
    for r in order:
        cks[r].commit(step)
    cks[0].prune(step)


def save(cks: list[Checkpointer], step: int, order=(0, 1)) -> None:
    write(cks, step)
    commit(cks, step, order)


def resume(folder: Path, unusable: tuple[str, ...] = ()) -> tuple[int, list[Checkpointer]]:
    """What a restart does: choose, then every rank loads its files; checks they agree.

    `unusable` names the files the choice must have reported as unusable (none by default).
    """
    choice, findings = choose(folder, 2)
    assert sorted(f.file for f in findings if f.unusable) == sorted(unusable), findings
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


def commit_until_crash(monkeypatch, cks: list[Checkpointer], step: int, order, budget: int) -> None:
    """Commit rank by rank in `order`, then prune, crashing after `budget` file operations."""
    with monkeypatch.context() as m:
        crash_after(m, budget)
        try:
            commit(cks, step, order)
        except Crash:
            pass


COMMIT_OPS = 7  # with a previous checkpoint: 2 renames per rank file, 2 for the global file, 1 manifest pruned


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
@pytest.mark.parametrize("budget", range(COMMIT_OPS + 1))
def test_crash_at_every_point_of_a_commit_resumes_consistently(tmp_path, monkeypatch, order, budget):
    cks = ranks(tmp_path)
    save(cks, 10)
    save(cks, 20)
    write(cks, 30)
    commit_until_crash(monkeypatch, cks, 30, order, budget)
    step, resumed = resume(tmp_path)
    assert step == (30 if budget >= COMMIT_OPS - 1 else 20)

    # The restarted run saves again, and crashes again anywhere: still consistent, never older.
    write(resumed, step + 5)
    commit_until_crash(monkeypatch, resumed, step + 5, order, budget)
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
    assert resume(tmp_path, unusable=(damaged,))[0] == 10


def test_keeps_latest_and_one_previous(tmp_path):
    cks = ranks(tmp_path)
    for step in (10, 20, 30):
        save(cks, step)
    names = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(files.RETIRED))
    assert [n for n in names if n.endswith(".pt")] == [
        "latest.pt", "latest_rank0.pt", "latest_rank1.pt", "prev.pt", "prev_rank0.pt", "prev_rank1.pt"]
    assert sorted(int(n.split("-")[1]) for n in names if n.startswith("manifest-")) == [20, 30]
    assert torch.load(tmp_path / "prev.pt", weights_only=True)["step"] == 20


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    import random

    import numpy as np
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.random(), np.random.rand(), torch.rand(1)  # move every stream on
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


# -- integrity: checksums, fallback, refusal ----------------------------------------------------

def big_save(cks: list[Checkpointer], step: int) -> None:
    """A save whose global file is mostly tensor bytes, so a flipped byte lands in tensor data."""
    sums = [ck.write(step, lambda: {"marker": torch.full((4,), float(step)), "weights": torch.ones(50_000)},
                     {"marker": step}) for ck in cks]
    cks[0].record(step, sums)
    commit(cks, step)


def test_bit_flip_in_latest_is_caught_by_its_checksum_and_falls_back(tmp_path):
    cks = ranks(tmp_path)
    big_save(cks, 10)
    big_save(cks, 20)
    data = bytearray((tmp_path / "latest.pt").read_bytes())
    data[len(data) // 2] ^= 0x01
    (tmp_path / "latest.pt").write_bytes(bytes(data))
    assert torch.load(tmp_path / "latest.pt", weights_only=True)["step"] == 20  # still loads: only the sum knows
    choice, findings = choose(tmp_path, 2)
    assert (choice.step, choice.global_slot) == (10, "prev")
    (finding,) = [f for f in findings if f.unusable]
    assert finding.file == "latest.pt" and "XXH3-128 does not match" in finding.reason


def test_missing_latest_falls_back_to_previous(tmp_path):
    cks = ranks(tmp_path)
    save(cks, 10)
    save(cks, 20)
    (tmp_path / "latest_rank0.pt").unlink()
    assert resume(tmp_path)[0] == 10


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_nothing_usable_is_an_error_that_lists_every_file_and_changes_nothing(tmp_path):
    cks = ranks(tmp_path)
    save(cks, 10)
    save(cks, 20)
    for name in ("latest.pt", "prev.pt"):
        (tmp_path / name).write_bytes((tmp_path / name).read_bytes()[:-10])
    before = snapshot(tmp_path)
    with pytest.raises(NoUsableCheckpoint) as e:
        choose(tmp_path, 2)
    assert "latest.pt: damaged" in str(e.value) and "prev.pt: damaged" in str(e.value)
    assert "\n" not in str(e.value)
    assert snapshot(tmp_path) == before


def test_files_of_another_format_version_are_refused(tmp_path):
    cks = ranks(tmp_path)
    save(cks, 10)
    state = torch.load(tmp_path / "latest.pt", weights_only=True)
    torch.save({**state, "format_version": 1}, tmp_path / "latest.pt")
    with pytest.raises(NoUsableCheckpoint, match="latest.pt: written in checkpoint format 1; this prefix reads"):
        choose(tmp_path, 2)


def test_a_checkpoint_whose_pickle_would_run_code_is_refused(tmp_path):
    cks = ranks(tmp_path)
    save(cks, 10)
    marker = tmp_path.parent / f"{tmp_path.name}-pwned"
    evil = {**torch.load(tmp_path / "latest.pt", weights_only=True), "payload": RunsCode(marker)}
    # The attacker can also write a manifest: only weights_only loading stands in the way.
    cks[0].record(10, [{"global": files.write_durably(evil, tmp_path / "latest.pt")}])
    with pytest.raises(NoUsableCheckpoint) as e:
        choose(tmp_path, 2)
    assert "latest.pt: refused: loading it would run code" in str(e.value) and "system" in str(e.value)
    assert not marker.exists()


@pytest.fixture
def small_disk(tmp_path, tmpfs):
    """A 160 KiB tmpfs: room for two checkpoints of the size below, not for a third during its write."""
    tmpfs(tmp_path / "disk", 160)
    return tmp_path / "disk" / "checkpoints"


def test_a_save_that_fills_the_disk_fails_cleanly_and_keeps_the_last_checkpoint(small_disk):
    ck = Checkpointer(small_disk, World(), CheckpointConfig())

    def state(step):
        return lambda: {"marker": torch.full((4,), float(step)), "weights": torch.ones(12_000)}  # 48 KB

    assert ck.save(10, state(10), {"marker": 10}).error is None
    assert ck.save(20, state(20), {"marker": 20}).error is None
    failed = ck.save(30, state(30), {"marker": 30})
    assert "No space left on device" in failed.error
    assert ck.committed_step == 20 and ck.resume_point() == "step 20 (latest.pt)"
    assert not list(small_disk.glob("*.tmp")), "a failed save must free the space it took"
    choice, findings = choose(small_disk, 1)
    assert (choice.step, findings) == (20, [])
    # Space comes back: the next interval's save succeeds and rotates as usual.
    (small_disk / "prev.pt").unlink()
    assert ck.save(40, state(40), {"marker": 40}).error is None
    assert choose(small_disk, 1)[0].step == 40


def cleaned_up() -> None:
    for thread in threading.enumerate():
        if thread.name == "checkpoint-cleanup":
            thread.join()


def test_a_commit_only_drops_names_and_the_replaced_files_are_freed_in_the_background(tmp_path, monkeypatch):
    """Freeing a large file takes ~0.3 s per GB: the commit must not pay it (nor a final save on its way out)."""
    ck = Checkpointer(tmp_path, World(rank=0, world_size=1), CheckpointConfig())
    links_of_replaced = []
    real_replace = os.replace

    def replace(src, dst):
        if os.path.exists(dst) and str(dst).endswith(".pt"):
            links_of_replaced.append(os.stat(dst).st_nlink)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    state = {"marker": torch.zeros(4)}
    for step in (10, 20, 30):
        assert ck.save(step, lambda: state, {"marker": step}).error is None
        cleaned_up()
        assert not list(tmp_path.glob(f"{files.RETIRED}*"))
    assert links_of_replaced and set(links_of_replaced) == {2}, "a replaced file had no second name"
    assert ck.save(40, lambda: state, {"marker": 40}, final=True).error is None
    cleaned_up()
    assert sorted(p.name for p in tmp_path.glob(f"{files.RETIRED}*")) == [
        "retired-latest.pt", "retired-latest_rank0.pt", "retired-prev.pt", "retired-prev_rank0.pt"]
    ck.clean_temporary()  # the next start
    cleaned_up()
    assert not list(tmp_path.glob(f"{files.RETIRED}*"))
    assert torch.load(tmp_path / "prev.pt", weights_only=True)["step"] == 30
    assert choose(tmp_path, 1)[0].step == 40


def test_temporary_files_of_an_interrupted_write_are_removed_at_start(tmp_path):
    cks = ranks(tmp_path)
    save(cks, 10)
    write(cks, 20)  # killed before its commit: temporary files and a manifest nothing refers to yet
    (tmp_path / "manifest-20-0000.json.tmp").write_text("{")
    assert len(list(tmp_path.glob("*.tmp"))) == 4
    cks[0].clean_temporary()
    assert not list(tmp_path.glob("*.tmp"))
    assert resume(tmp_path)[0] == 10
