"""`checkpoint.every_seconds: auto`: the Young–Daly interval from a run's own history."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
from helpers import read_jsonl, run, train_cmd

from prefix.checkpoint.interval import AutoInterval, mean_time_between_failures, young_daly

HISTORY = [  # a synthetic meta/starts.jsonl: started, preempted, killed, extended after finishing
    {"time": 1000.0, "start_step": 0, "restart": 0},
    {"time": 4600.0, "start_step": 300, "restart": 1, "previous_end": "preempted with a final checkpoint"},
    {"time": 6400.0, "start_step": 450, "restart": 2, "previous_end": "killed without a final checkpoint"},
    {"time": 9000.0, "start_step": 700, "restart": 3, "previous_end": "finished"},
]


def saves(*stalls: float) -> list[dict]:
    return [{"step": 10 * i, "stall_s": s, "ok": True} for i, s in enumerate(stalls, 1)]


def test_young_daly_and_its_bounds() -> None:
    assert young_daly(2.0, 3600.0, 60, 1800) == pytest.approx(120.0)  # sqrt(2 * 2 * 3600)
    assert young_daly(0.01, 3600.0, 60, 1800) == 60  # cheap saves: the minimum
    assert young_daly(50.0, 86400.0, 60, 1800) == 1800  # rare failures: the maximum


def test_time_between_failures_counts_only_failures_that_lost_work() -> None:
    assert mean_time_between_failures(HISTORY) == (pytest.approx(9000 - 1000), 1)
    assert mean_time_between_failures(HISTORY, working_s=5000.0) == (5000.0, 1), "training time, not the span"
    assert mean_time_between_failures(HISTORY[:1]) == (None, 0)
    assert mean_time_between_failures(HISTORY[:2]) == (None, 0), "a SIGTERM with a final checkpoint redoes nothing"
    assert mean_time_between_failures([HISTORY[0], HISTORY[3]]) == (None, 0), "finishing is no failure"
    crashed = [*HISTORY[:3], {**HISTORY[3], "previous_end": "crashed"}]
    assert mean_time_between_failures(crashed, working_s=5000.0) == (2500.0, 2)


def test_interval_from_a_synthetic_history() -> None:
    auto = AutoInterval.of(60, 1800, HISTORY, saves(9.0, 1.0, 2.0, 3.0, 2.0, 40.0), working_s=4000.0)
    assert auto.cost_s == 2.0, "the median of the last five saves' stalls"
    assert auto.seconds() == pytest.approx(math.sqrt(2 * 2.0 * 4000))  # ~126 s
    assert auto.inputs() == {"every_seconds": 126.5, "save_cost_s": 2.0, "mtbf_s": 4000.0, "failures": 1,
                             "min_seconds": 60, "max_seconds": 1800}
    auto.observe(30.0)
    assert auto.cost_s == 3.0 and auto.seconds() == pytest.approx(math.sqrt(2 * 3.0 * 4000))
    assert AutoInterval.of(60, 1800, HISTORY, [], 4000.0).seconds() == 60, "no save measured yet: save soon to measure one"
    assert AutoInterval.of(60, 1800, HISTORY[:1], saves(2.0)).seconds() == 1800, "no failure yet: the maximum"
    failed = [{"step": 10, "stall_s": 99.0, "ok": False}, *saves(1.0)]
    assert AutoInterval.of(60, 1800, HISTORY, failed).cost_s == 1.0, "a failed save is no measure of cost"


def test_a_start_logs_the_interval_it_chose_from_the_run_history(tmp_path: Path) -> None:
    quick = ("trainer.eval_every=0", "trainer.sample_tokens=0")
    assert run(train_cmd(0, "r", tmp_path, "trainer.max_steps=5", *quick)).returncode == 0
    run_dir, now = tmp_path / "r", time.time()
    history = [{"time": now - 7200, "start_step": 0, "restart": 0},
               {"time": now - 3600, "start_step": 3, "restart": 1, "previous_end": "crashed"}]
    (run_dir / "meta" / "starts.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    (run_dir / "metrics" / "checkpoint.jsonl").write_text("".join(json.dumps(s) + "\n" for s in saves(*[2.0] * 5)))
    ledger = [  # the first start: launched at -7210, looping from -7200 to -3700 (3500 s); the second: start-up only
        {"step": 0, "time": now - 7200, "event": "start", "restart": 0, "process_start": now - 7210, "lease_wait": 0},
        {"step": 3, "time": now - 3700, "restart": 0, "train": 3400.0, "eval": 0.0, "checkpoint": 100.0},
        {"step": 3, "time": now - 3590, "event": "start", "restart": 1, "process_start": now - 3600, "lease_wait": 0}]
    (run_dir / "metrics" / "time.jsonl").write_text("".join(json.dumps(t) + "\n" for t in ledger))

    result = run(train_cmd(0, "r", tmp_path, "trainer.max_steps=8", "checkpoint.every_seconds=auto", *quick))
    assert result.returncode == 0, result.stderr[-3000:]
    (chosen,) = [e for e in read_jsonl(run_dir / "logs" / "rank0.jsonl") if e["event"].startswith("checkpoint interval")]
    assert chosen["failures"] == 1 and chosen["save_cost_s"] == 2.0
    assert chosen["mtbf_s"] == pytest.approx(3500, abs=1), "the training time per failure, from the goodput ledger"
    assert chosen["every_seconds"] == pytest.approx(math.sqrt(2 * 2.0 * chosen["mtbf_s"]), abs=0.1)
    recorded = read_jsonl(run_dir / "metrics" / "checkpoint.jsonl")[5:]
    assert [r["step"] for r in recorded] == [8] and recorded[0]["stall_s"] > 0 and recorded[0]["bytes"] > 0
