"""A restart's start-up order (docs/performance.md#restart-time): rank 0 takes the run's lease and verifies the
checkpoint before the process group is up, in a thread; what it finds, or why it refuses, reaches every rank as
before. Real torchrun, 2 ranks on gloo. Times are measured by bench/restart.py, never asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import structlog
from helpers import REPO, assert_workers_exit_2, run, train_cmd

from prefix.runs.lease import Lease, claims


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (None for a folder)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def one_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    """Both workers exited 2; the line is printed once (rank 0), not once per rank."""
    assert_workers_exit_2(result, fragment)
    assert sum(line.startswith("error:") for line in result.stderr.splitlines()) == 1, result.stderr[-3000:]


def test_a_damaged_checkpoint_is_one_line_exit_2_on_both_ranks_and_changes_nothing(tmp_path: Path) -> None:
    assert run(train_cmd(2, "r", tmp_path, "trainer.max_steps=2")).returncode == 0
    latest = tmp_path / "r" / "checkpoints" / "latest.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # the only checkpoint: nothing usable is left
    before = tree(tmp_path)
    result = run(train_cmd(2, "r", tmp_path, "trainer.max_steps=4"))
    one_error(result, "no usable checkpoint (latest.pt: damaged or truncated")
    assert tree(tmp_path) == before, "a refused start leaves the runs folder as it was"


def test_a_run_held_by_a_live_start_is_refused_on_both_ranks_before_any_reading(tmp_path: Path) -> None:
    """Rank 0 waits for the lease while rank 1 waits for the process group; the refusal reaches both."""
    assert run(train_cmd(2, "r", tmp_path, "trainer.max_steps=2")).returncode == 0
    live = Lease.take(tmp_path / "r", 2.0, structlog.get_logger())  # this test process holds the run, renewing
    live.renew_in_background()
    try:
        before, epochs = tree(tmp_path), sorted(claims(tmp_path / "r" / "lease"))
        result = run(train_cmd(2, "r", tmp_path, "trainer.max_steps=4", "run.lease_timeout_s=2"))
        one_error(result, "held by another live start")
        assert "resumed from step" not in result.stderr
        assert tree(tmp_path) == before and sorted(claims(tmp_path / "r" / "lease")) == epochs
    finally:
        live.release()


def test_the_benchmark_quick_mode_writes_its_results(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(REPO / "bench" / "restart.py"), "--quick", "--out", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    body = json.loads((tmp_path / "restart.json").read_text())
    assert body["benchmark"] == "restart" and body["quick"] is True
    assert {"floor_s", "now_above_floor_s", "at_628b6ac_above_floor_s", "now_s", "at_628b6ac_s"} <= body["figures"].keys()
    assert [c["unit"] for c in body["checks"]] == ["×", "×"] and body["checks"][0]["goal"] == "≤ 0.5×"
