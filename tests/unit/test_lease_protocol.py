"""The run lease on real files: waiting, refusal, release, takeover, fencing, and checkpoint ceilings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import structlog

from prefix.checkpoint.files import FileSum, write_manifest
from prefix.checkpoint.resume import choose
from prefix.errors import EXIT_FENCED
from prefix.runs import lease as lease_mod
from prefix.runs.lease import Lease, LeaseRefused, claim_name, claims, read_claim

LOG = structlog.get_logger()


def forge(run: Path, epoch: int, **fields) -> Path:
    """A claim of `epoch` as another start would have written it."""
    folder = run / "lease"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / claim_name(epoch)
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "pid_start": 0, "start_id": "other",
                                "timeout_s": 1.0, **fields}))
    return path


def test_first_start_claims_epoch_1_and_a_clean_exit_lets_the_next_start_in_at_once(tmp_path: Path) -> None:
    run = tmp_path / "r"
    first = Lease.take(run, 30.0, LOG)
    assert first.epoch == 1 and first.holder and first.waited_s < 1
    assert read_claim(first.claim)["pid"] == os.getpid()
    first.wrote = True
    first.release()
    began = time.monotonic()
    second = Lease.take(run, 30.0, LOG)
    assert second.epoch == 2 and time.monotonic() - began < 5, "a released lease is not waited for"
    second.release()


def test_a_live_holder_makes_a_second_start_wait_then_refuses_it_naming_the_holder(tmp_path: Path) -> None:
    run = tmp_path / "r"
    holder = Lease.take(run, 1.0, LOG)
    holder.renew_in_background()
    began = time.monotonic()
    with pytest.raises(LeaseRefused) as refused:
        Lease.take(run, 1.0, LOG)
    waited = time.monotonic() - began
    assert waited >= 1.0, "refused only after the timeout plus a margin of watching it renew"
    message = str(refused.value)
    assert f"pid {os.getpid()}" in message and "epoch 1" in message and "renewed" in message
    assert sorted(claims(run / "lease")) == [1], "the refused start claimed nothing"
    holder.release()


def test_a_stopping_holder_is_waited_for_past_the_refusal_point(tmp_path: Path) -> None:
    run = tmp_path / "r"
    stopping = [False]
    holder = Lease.take(run, 1.0, LOG)
    holder.wrote = True  # it trained: its release leaves the epoch behind
    holder.renew_in_background(stopping=lambda: stopping[0])
    stopping[0] = True  # SIGTERM: the holder flushes its final checkpoint
    time.sleep(0.5)  # its renewal thread marks it stopping
    import threading

    threading.Timer(2.5, holder.release).start()  # beyond 1.5 × timeout: a refusal if it were not stopping
    taken = Lease.take(run, 1.0, LOG)
    assert taken.epoch == 2 and taken.waited_s >= 2.0
    taken.release()


def test_a_lease_not_renewed_is_taken_over_with_the_next_epoch(tmp_path: Path) -> None:
    run = tmp_path / "r"
    forge(run, 4, timeout_s=1.0)
    taken = Lease.take(run, 1.0, LOG)
    assert taken.epoch == 5 and taken.waited_s >= 1.0, "waited one timeout of no renewal"
    taken.release()


def test_a_holder_on_this_host_whose_process_is_gone_is_not_waited_for(tmp_path: Path) -> None:
    run = tmp_path / "r"
    me = lease_mod.identity(30.0, "dead")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    forge(run, 1, **{**me, "pid": dead.pid, "timeout_s": 30.0})
    taken = Lease.take(run, 30.0, LOG)
    assert taken.epoch == 2 and taken.waited_s < 5
    taken.release()


def test_a_start_that_wrote_nothing_leaves_no_trace(tmp_path: Path) -> None:
    run = tmp_path / "r"
    Lease.take(run, 30.0, LOG).release()  # it wrote nothing into the run
    assert not run.exists()


FENCED = textwrap.dedent("""
    import sys, time, structlog
    from pathlib import Path
    from prefix.runs.lease import Lease
    run = Path(sys.argv[1])
    lease = Lease.take(run, 1.0, structlog.get_logger())
    print("took", lease.epoch, flush=True)
    sys.stdin.readline()  # the test claims the next epoch meanwhile, as a start that took over would
    time.sleep(0.6)  # more than half the timeout since the last renewal (none runs: no thread)
    lease.check()
    (run / "written").write_text("a fenced start wrote this")
""")


def test_a_fenced_holder_exits_before_its_next_write(tmp_path: Path) -> None:
    run = tmp_path / "r"
    proc = subprocess.Popen([sys.executable, "-c", FENCED, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().split() == ["took", "1"]
    forge(run, 2)
    out, err = proc.communicate("go\n", timeout=60)
    assert proc.returncode == EXIT_FENCED, err
    assert not (run / "written").exists()
    assert "fenced" in err and "epoch 2" in err


def test_resume_passes_over_a_checkpoint_an_older_epoch_committed_after_a_takeover(tmp_path: Path) -> None:
    import torch

    from prefix.checkpoint.checksums import file_sum
    from prefix.checkpoint.files import FORMAT_VERSION

    run, folder = tmp_path / "r", tmp_path / "r" / "checkpoints"
    folder.mkdir(parents=True)
    forge(run, 1, resumed_step=0)
    forge(run, 2, resumed_step=10)  # epoch 2 resumed from step 10
    for slot, step, epoch in (("prev", 10, 1), ("latest", 15, 1)):  # the zombie of epoch 1 committed step 15
        sums: dict[str, FileSum] = {}
        for name, role in ((f"{slot}.pt", "global"), (f"{slot}_rank0.pt", "rank0")):
            torch.save({"step": step, "format_version": FORMAT_VERSION}, folder / name)
            sums[role] = file_sum(folder / name)
        write_manifest(folder, step, 1, sums, epoch)
    assert lease_mod.ceilings(run) == {1: 10}
    chosen, findings = choose(folder, 1, lease_mod.ceilings(run))
    assert chosen is not None and chosen.step == 10 and chosen.global_slot == "prev"
    assert any("lease epoch 1" in f.reason for f in findings)
    assert choose(folder, 1)[0].step == 15, "without the lease's ceilings the newest step wins"


def test_every_rank_looks_from_a_thread_so_the_fence_check_costs_nothing(tmp_path: Path) -> None:
    """A rank that does not hold the lease still looks for a newer epoch in the background: its `check`
    before a write is then an in-memory comparison, not a listing of lease/ and a pause."""
    run = tmp_path / "r"
    holder = Lease.take(run, 1.2, LOG)
    holder.wrote = True
    follower = Lease(run, holder.epoch, 1.2, LOG, holder=False)
    before = follower._verified
    follower.renew_in_background()
    time.sleep(0.8)
    assert follower._verified > before, "the follower's thread looked at lease/ by itself"
    follower.release()
    holder.release()
    assert (run / "lease" / "epoch-000000000001.released").exists(), "only the holder releases"
