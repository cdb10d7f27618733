"""The promise: a run stopped by SIGTERM or SIGKILL and restarted is bitwise the run that never stopped.

Real torchrun, 2 ranks on gloo, real signals, real files.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
from helpers import (
    Launch,
    assert_same_run,
    checkpoint,
    losses,
    read_jsonl,
    run,
    train_cmd,
    uninterrupted,
)

STEPS = 120
SETTINGS = (f"trainer.max_steps={STEPS}", "checkpoint.every_steps=10", "trainer.eval_every=40")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    """The same run, never interrupted."""
    return uninterrupted(tmp_path_factory.mktemp("baseline"), "base", *SETTINGS)


def test_sigterm_resume_is_bitwise_identical(baseline: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    first = Launch(train_cmd(2, "r", tmp_path, *SETTINGS), tmp_path / "log1")
    first.wait_for_step(run_dir, random.randint(15, 60))
    first.sigterm()
    first.wait()
    stopped_at = max(losses(run_dir))
    assert stopped_at < STEPS, "the signal must land before the end for this test to mean anything"
    assert checkpoint(run_dir).step == stopped_at, "the final checkpoint holds the last completed step"
    rank_logs = [read_jsonl(run_dir / "logs" / f"rank{r}.jsonl") for r in (0, 1)]
    for log in rank_logs:
        assert any(e["event"] == "stopped by signal after final checkpoint" for e in log)

    second = Launch(train_cmd(2, "r", tmp_path, *SETTINGS), tmp_path / "log2")
    assert second.wait() == 0
    assert any(e["event"] == f"resumed from step {stopped_at}" for e in read_jsonl(run_dir / "logs" / "rank0.jsonl"))
    assert_same_run(run_dir, baseline)
    assert checkpoint(run_dir).optimizer["state"].keys() == checkpoint(baseline).optimizer["state"].keys()
    starts = read_jsonl(run_dir / "meta" / "starts.jsonl")
    assert [s["start_step"] for s in starts] == [0, stopped_at]
    assert [s["restart"] for s in starts] == [0, 1]


def test_sigkill_redoes_only_steps_since_last_checkpoint(baseline: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    first = Launch(train_cmd(2, "r", tmp_path, *SETTINGS), tmp_path / "log1")
    first.wait_for_step(run_dir, random.randint(25, 70))
    first.kill_all()
    killed_at = max(losses(run_dir))
    saved = checkpoint(run_dir).step
    assert saved <= killed_at < STEPS

    second = Launch(train_cmd(2, "r", tmp_path, *SETTINGS), tmp_path / "log2")
    assert second.wait() == 0
    starts = read_jsonl(run_dir / "meta" / "starts.jsonl")
    resumed = starts[-1]["start_step"]
    # at most one interval, plus the steps an asynchronous write of the next checkpoint was in flight
    assert resumed == saved and killed_at - resumed <= 2 * 10, "redo at most about one checkpoint interval"
    assert_same_run(run_dir, baseline)


def test_sigkill_during_a_background_write_resumes_the_previous_checkpoint(baseline: Path, tmp_path: Path) -> None:
    """Killed while an asynchronous write is in flight: its files stay temporary, the step before is resumed.

    The kill lands as soon as a `.tmp` file appears; if the write had already been committed by then,
    the run is resumed and killed again, until a kill caught a write in flight.
    """
    run_dir = tmp_path / "r"
    folder = run_dir / "checkpoints"
    caught = None
    for attempt in range(6):
        launch = Launch(train_cmd(2, "r", tmp_path, *SETTINGS), tmp_path / f"log{attempt}")
        launch.wait_for_step(run_dir, max(losses(run_dir), default=0) + 3)
        deadline = time.monotonic() + 60
        while not list(folder.glob("*.tmp")) and time.monotonic() < deadline:
            time.sleep(0.001)
        launch.kill_all()
        started = [e["step"] for e in read_jsonl(run_dir / "logs" / "rank0.jsonl")
                   if e["event"] == "checkpoint write started"]
        committed = checkpoint(run_dir).step if (folder / "latest.pt").exists() else 0
        if list(folder.glob("*.tmp")) and started and committed < started[-1]:
            caught = (started[-1], committed)
            break
    assert caught, "no kill landed while a write was in flight"
    in_flight, committed = caught

    last = Launch(train_cmd(2, "r", tmp_path, *SETTINGS), tmp_path / "log-last")
    assert last.wait() == 0, (tmp_path / "log-last").read_text()[-3000:]
    resumed = read_jsonl(run_dir / "meta" / "starts.jsonl")[-1]["start_step"]
    assert resumed == committed < in_flight
    assert_same_run(run_dir, baseline)


def test_restarting_a_finished_run_exits_zero_at_once(baseline: Path) -> None:
    before = (baseline / "checkpoints" / "latest.pt").stat().st_mtime_ns
    result = run(train_cmd(2, "base", baseline.parent, *SETTINGS))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "run already finished" in result.stderr
    assert (baseline / "checkpoints" / "latest.pt").stat().st_mtime_ns == before
