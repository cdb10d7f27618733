"""One writer per run: two starts of one run, a frozen start that wakes, takeover after a kill.

Real torchrun with 2 ranks on gloo, real signals (SIGSTOP/SIGCONT for a frozen node), real files.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import psutil
import pytest
from helpers import (
    Launch,
    assert_same_run,
    checkpoint,
    losses,
    read_jsonl,
    train_cmd,
    uninterrupted,
)

from prefix.runs import RunDir
from prefix.runs.lease import claim_name, claims
from prefix.tools import status
from prefix.tools.chaos_report import snapshot
from prefix.tools.processes import ProcessTree

STEPS = 400
SETTINGS = (f"trainer.max_steps={STEPS}", "checkpoint.every_steps=20", "trainer.eval_every=100",
            "trainer.log_every=5")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    """The same run, never interrupted."""
    return uninterrupted(tmp_path_factory.mktemp("baseline"), "base", *SETTINGS)


def wait_for_text(path: Path, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in {path} within {timeout}s:\n{path.read_text()[-3000:]}")


def test_a_second_live_start_waits_then_is_refused_and_the_live_run_is_unharmed(baseline: Path, tmp_path: Path):
    run_dir, lease = tmp_path / "r", ("run.lease_timeout_s=3",)
    live = Launch(train_cmd(2, "r", tmp_path, *SETTINGS, *lease), tmp_path / "live.log")
    live.wait_for_step(run_dir, 10)
    second = Launch(train_cmd(0, "r", tmp_path, *SETTINGS, *lease), tmp_path / "second.log")
    assert second.wait() == 2
    out = (tmp_path / "second.log").read_text()
    assert "waiting for the run's lease" in out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "held by another live start" in errors[0] and "pid" in errors[0], out
    assert "Traceback" not in out
    assert "resumed from step" not in out and "starting" not in out, "refused before it read or wrote anything"
    assert live.proc.poll() is None, "the live run is still training"
    assert live.wait() == 0, (tmp_path / "live.log").read_text()[-3000:]
    assert sorted(claims(run_dir / "lease")) == [1], "the refused start claimed no epoch"
    assert_same_run(run_dir, baseline)


def test_a_start_during_the_final_checkpoint_waits_and_resumes_from_it(baseline: Path, tmp_path: Path) -> None:
    run_dir, lease = tmp_path / "r", ("run.lease_timeout_s=5",)
    first = Launch(train_cmd(2, "r", tmp_path, *SETTINGS, *lease, launcher=True), tmp_path / "first.log")
    first.wait_for_step(run_dir, 10)
    second = Launch(train_cmd(2, "r", tmp_path, *SETTINGS, *lease), tmp_path / "second.log")
    wait_for_text(tmp_path / "second.log", "waiting for the run's lease")
    first.sigterm()  # the replacement is already waiting while the old start flushes its final checkpoint
    assert first.wait() == 143
    stopped_at = checkpoint(run_dir).step
    assert max(losses(run_dir)) <= stopped_at < STEPS  # the final checkpoint holds the last step (logged every 5)
    assert second.wait() == 0, (tmp_path / "second.log").read_text()[-3000:]
    events = [e["event"] for e in read_jsonl(run_dir / "logs" / "rank0.jsonl")]
    assert f"resumed from step {stopped_at}" in events
    assert sorted(claims(run_dir / "lease")) == [1, 2]
    assert_same_run(run_dir, baseline)


def test_a_frozen_start_that_wakes_after_a_takeover_writes_nothing(baseline: Path, tmp_path: Path) -> None:
    run_dir, lease = tmp_path / "r", ("run.lease_timeout_s=2",)
    zombie = Launch(train_cmd(2, "r", tmp_path, *SETTINGS, *lease, launcher=True), tmp_path / "zombie.log")
    zombie.wait_for_step(run_dir, 30)
    frozen = ProcessTree(zombie.proc.pid)
    for p in frozen.procs.values():  # a frozen or partitioned node: every process of the start stops
        p.send_signal(signal.SIGSTOP)
    replacement = Launch(train_cmd(2, "r", tmp_path, *SETTINGS, *lease), tmp_path / "replacement.log")
    assert replacement.wait() == 0, (tmp_path / "replacement.log").read_text()[-3000:]
    assert "did not renew it" in (tmp_path / "replacement.log").read_text()
    before = snapshot(run_dir)  # every file of checkpoints/ and metrics/, with its size and mtime
    for p in frozen.procs.values():
        p.send_signal(signal.SIGCONT)
    assert zombie.wait(120) == 3, (tmp_path / "zombie.log").read_text()[-3000:]  # EXIT_FENCED, via prefix launch
    assert "fenced" in (tmp_path / "zombie.log").read_text()
    assert snapshot(run_dir) == before, "the woken start changed the run"
    alive = psutil.wait_procs([p for p in frozen.procs.values() if p.pid != zombie.proc.pid], timeout=15)[1]
    assert not alive, f"processes of the fenced start outlived it: {alive}"  # data workers notice within 5 s
    assert_same_run(run_dir, baseline)


def test_a_killed_holder_is_taken_over_and_a_clean_exit_releases(tmp_path: Path) -> None:
    run_dir, short = tmp_path / "r", ("trainer.max_steps=300", "checkpoint.every_steps=10", "run.lease_timeout_s=2")
    first = Launch(train_cmd(0, "r", tmp_path, *short), tmp_path / "1.log")
    first.wait_for_step(run_dir, 5)
    first.kill_all()
    # On the same host, a holder whose process is gone is not waited for.
    second = Launch(train_cmd(0, "r", tmp_path, *short), tmp_path / "2.log")
    second.wait_for_step(run_dir, max(losses(run_dir)) + 5)
    second.kill_all()
    assert "is gone" in (tmp_path / "2.log").read_text()
    # Killed on another node: nothing tells whether it lives, so the lease must lapse first.
    claim = run_dir / "lease" / claim_name(2)
    claim.write_text(json.dumps({**json.loads(claim.read_text()), "host": "another-node"}))
    third = Launch(train_cmd(0, "r", tmp_path, *short), tmp_path / "3.log")
    assert third.wait() == 0, (tmp_path / "3.log").read_text()[-3000:]
    out = (tmp_path / "3.log").read_text()
    assert "waiting for the run's lease" in out and "did not renew it" in out
    # A clean exit released the lease: the next start is not held up (and, the run being finished, it
    # writes nothing, its claim included).
    fourth = Launch(train_cmd(0, "r", tmp_path, *short), tmp_path / "4.log")
    assert fourth.wait() == 0
    assert "waiting for the run's lease" not in (tmp_path / "4.log").read_text()
    assert sorted(claims(run_dir / "lease")) == [1, 2, 3]
    ledger = [line for line in read_jsonl(run_dir / "metrics" / "time.jsonl") if line.get("event") == "start"]
    assert ledger[2]["lease_wait"] >= 2.0, "the lapse waited for is counted in the goodput ledger"
    shown = status.describe(status.details(RunDir(run_dir), time.time()))
    assert "lease       host" in shown and "epoch 3): released" in shown, shown
    assert status.details(RunDir(run_dir), time.time())["goodput"]["parts"]["lease"] >= 2.0
