"""Goodput: a run preempted, killed and finished; its time accounted for, part by part."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from helpers import Launch, losses, read_jsonl, train_cmd

from prefix.runs.goodput import PARTS, account

SETTINGS = ("trainer.max_steps=100", "checkpoint.every_steps=20", "trainer.eval_every=25", "trainer.log_every=5")


def test_goodput_parts_add_up_to_the_wall_time_across_restarts(tmp_path: Path) -> None:
    run_dir, lifetimes = tmp_path / "r", []
    started = time.monotonic()
    first = Launch(train_cmd(0, "r", tmp_path, *SETTINGS), tmp_path / "log1")
    first.wait_for_step(run_dir, 30)
    first.sigterm()
    first.wait()
    lifetimes.append(time.monotonic() - started)

    started = time.monotonic()
    second = Launch(train_cmd(0, "r", tmp_path, *SETTINGS), tmp_path / "log2")
    target = second.wait_for_step(run_dir, max(losses(run_dir)) + 32)
    deadline = time.monotonic() + 60  # the ledger's line is written just after the metrics line: let it land
    while max((line["step"] for line in read_jsonl(run_dir / "metrics" / "time.jsonl")), default=0) < target:
        assert time.monotonic() < deadline, "no ledger line for the logged step"
        time.sleep(0.01)
    second.kill_all()
    lifetimes.append(time.monotonic() - started)

    started = time.monotonic()
    third = Launch(train_cmd(0, "r", tmp_path, *SETTINGS), tmp_path / "log3")
    assert third.wait() == 0, (tmp_path / "log3").read_text()[-3000:]
    lifetimes.append(time.monotonic() - started)

    result = account(run_dir / "metrics")
    parts = result["parts"]
    assert result["starts"] == 3
    assert abs(sum(parts[p] for p in PARTS) - result["wall"]) < 1e-6
    assert abs(result["wall"] - sum(lifetimes)) < 2.0 * 3, (result["wall"], lifetimes)
    assert 0 <= parts["other"] < 0.15 * result["wall"], parts
    assert parts["redone"] > 0, "the SIGKILL lost the steps after the last checkpoint"
    assert all(parts[p] > 0 for p in ("startup", "productive", "eval", "checkpoint"))
    assert 0 < result["goodput"] < 1

    starts = read_jsonl(run_dir / "meta" / "starts.jsonl")
    per_step = parts["productive"] / 100
    assert parts["redone"] / per_step == pytest.approx(starts[2]["steps_redone"], rel=0.5, abs=5)
