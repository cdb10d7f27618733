"""`checkpoint.every_steps: 1`: saves that come due while a write is in flight are skipped, and resume stays exact.

Real torchrun, 2 ranks on gloo, real signals. A skipped save writes nothing, so a kill at any moment resumes
the last committed step and the run ends bitwise the run that never stopped; the final save is never skipped.
"""

from __future__ import annotations

import random
from pathlib import Path

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

STEPS = 40
SETTINGS = (f"trainer.max_steps={STEPS}", "checkpoint.every_steps=1", "checkpoint.every_seconds=0",
            "trainer.eval_every=0", "trainer.log_every=1")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    return uninterrupted(tmp_path_factory.mktemp("baseline"), "base", *SETTINGS)


def saves(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "metrics" / "checkpoint.jsonl")


def test_every_step_saves_or_skips_and_the_last_save_is_the_final_step(baseline: Path) -> None:
    lines = saves(baseline)
    periodic = [s for s in lines if s["step"] < STEPS]
    assert all(s["ok"] and s["async"] for s in periodic) and lines[-1]["step"] == STEPS and not lines[-1]["async"]
    # every boundary from the first to the last asked for a save: each was committed or skipped
    assert len(periodic) + sum(s["skipped"] for s in lines) == STEPS - 1
    assert checkpoint(baseline).step == STEPS


def test_sigkill_resumes_the_last_committed_step_and_ends_bitwise(baseline: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    first = Launch(train_cmd(2, "r", tmp_path, *SETTINGS), tmp_path / "log1")
    first.wait_for_step(run_dir, random.randint(8, 30))
    first.kill_all()
    killed_at = max(losses(run_dir))
    committed = checkpoint(run_dir).step
    assert committed <= killed_at

    second = Launch(train_cmd(2, "r", tmp_path, *SETTINGS), tmp_path / "log2")
    assert second.wait() == 0, (tmp_path / "log2").read_text()[-3000:]
    assert read_jsonl(run_dir / "meta" / "starts.jsonl")[-1]["start_step"] == committed
    assert_same_run(run_dir, baseline)


def test_sigterm_saves_the_step_it_stopped_at_whatever_is_in_flight(baseline: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    first = Launch(train_cmd(2, "r", tmp_path, *SETTINGS), tmp_path / "log1")
    first.wait_for_step(run_dir, random.randint(8, 30))
    first.sigterm()
    first.wait()
    stopped_at = max(losses(run_dir))
    assert any(e["event"] == "stopped by signal after final checkpoint" for e in read_jsonl(run_dir / "logs" / "rank0.jsonl"))
    final = saves(run_dir)[-1]
    assert checkpoint(run_dir).step == final["step"] == stopped_at and final["ok"] and not final["async"]

    second = Launch(train_cmd(2, "r", tmp_path, *SETTINGS), tmp_path / "log2")
    assert second.wait() == 0
    assert_same_run(run_dir, baseline)
