"""The goodput model (interval.lost_share), the preemption schedule, and the costs read back from a run."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from prefix.checkpoint.interval import lost_share, young_daly
from prefix.runs.goodput import account
from prefix.tools.schedule import Costs, Schedule, measure, predict


def test_lost_share_counts_saves_restarts_and_half_an_interval_per_kill() -> None:
    # C 1 s per save every T 10 s, R 5 s, a preemption every M 100 s: 5 + 10/2 + 95 × 1/10 = 19.5 s of 100
    assert lost_share(1.0, 10.0, 5.0, 100.0) == pytest.approx(0.195)
    assert lost_share(1.0, 10.0, 5.0, 100.0, kill_share=0.0) == pytest.approx(0.145), "a SIGTERM redoes nothing"
    assert lost_share(1.0, 10.0, 5.0, 100.0, kill_share=0.5) == pytest.approx(0.17)
    assert lost_share(5.0, 1.0, 50.0, 100.0) == 1.0, "never more than all of it"


def test_the_minimum_is_young_daly_when_restarts_are_short() -> None:
    cost, mtbf = 2.0, 3600.0
    best = min((t / 10 for t in range(10, 5000)), key=lambda t: lost_share(cost, t, 0.0, mtbf))
    assert best == pytest.approx(young_daly(cost, mtbf, 0, math.inf), abs=0.1)  # sqrt(2 C M) = 120 s
    # with a restart R the time between restarts is M − R; with half the preemptions kills, twice the interval
    best = min((t / 10 for t in range(10, 5000)), key=lambda t: lost_share(cost, t, 600.0, mtbf, kill_share=0.5))
    assert best == pytest.approx(math.sqrt(2 * cost * (mtbf - 600) / 0.5), abs=0.1)


def test_a_schedule_spreads_its_gaps_and_alternates_kinds_when_mixed() -> None:
    gaps = list(Schedule(20.0, "mix", jitter=0.5, seed=3, limit=8))
    assert len(gaps) == 8 and all(10 <= g <= 30 for g, _ in gaps)
    assert sum(g for g, _ in gaps) == pytest.approx(8 * 20.0), "whole rounds average to the period"
    for round_ in (gaps[:4], gaps[4:]):
        assert sorted(k for _, k in round_) == ["kill", "kill", "term", "term"]
    assert gaps == list(Schedule(20.0, "mix", jitter=0.5, seed=3, limit=8)), "seeded"
    assert list(Schedule(20.0, "kill", limit=3)) == [(20.0, "kill")] * 3
    assert len(list(itertools.islice(Schedule(5.0), 100))) == 100, "no limit: until the run completes"


def write_run(run_dir: Path, starts: list[dict], ledger: list[dict], saves: list[dict]) -> None:
    metrics = run_dir / "metrics"
    metrics.mkdir(parents=True)
    lines = [{"event": "start", "lease_wait": 0.0, **s} for s in starts] + ledger
    (metrics / "time.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (metrics / "checkpoint.jsonl").write_text("".join(json.dumps({"ok": True, **s}) + "\n" for s in saves))


def test_costs_and_prediction_read_back_from_a_run(tmp_path: Path) -> None:
    # start 0: launched at 0, trains from 10 s, saves every 10 s, killed after step 35 (resumes at 30);
    # start 1: launched at 60, trains from 65, saves at 80, 90, then a final save at its stop (step 50)
    starts = [{"restart": 0, "step": 0, "time": 10.0, "process_start": 0.0},
              {"restart": 1, "step": 30, "time": 65.0, "process_start": 60.0}]
    ledger = [{"restart": 0, "step": 35, "time": 55.0, "train": 40.0, "eval": 0.0, "checkpoint": 3.0},
              {"restart": 1, "step": 50, "time": 95.0, "train": 28.0, "eval": 0.0, "checkpoint": 2.0}]
    saves = [{"step": s, "time": t, "stall_s": c, "async": False}
             for s, t, c in [(10, 20.0, 1.0), (20, 30.0, 1.0), (30, 40.0, 1.0), (40, 80.0, 1.0), (45, 90.0, 0.5),
                             (50, 92.0, 0.5)]]
    write_run(tmp_path, starts, ledger, saves)
    g = account(tmp_path / "metrics")
    costs = measure(tmp_path, g)
    assert costs.save_s == 1.0 and costs.final_s == 1.0
    assert costs.interval_s == 10.0, "the final save at a stop is no interval"
    assert costs.restart_s == pytest.approx((10 + 5) / 2)
    steady = account(tmp_path / "metrics", range(1, 2))
    assert steady["starts"] == 1 and steady["wall"] == pytest.approx(35.0)
    assert measure(tmp_path, steady, range(1, 2)).restart_s == pytest.approx(5.0)
    assert 0 < g["goodput"] < 1 and sum(g["parts"].values()) == pytest.approx(g["wall"])
    seen = account(tmp_path / "metrics", killed={0: 58.0})  # the harness killed start 0 at 58 s
    assert seen["parts"]["redone"] == pytest.approx(g["parts"]["redone"] + 3.0), "the step in progress at the kill"
    assert seen["wall"] == pytest.approx(g["wall"] + 3.0) and seen["down"] == pytest.approx(g["down"] - 3.0)

    expected = 1 - lost_share(1.0, 10.0, 7.5 * 2, g["wall"], 1.0)  # 2 starts' restarts on 1 kill
    assert predict(costs, g["wall"], g["starts"], kills=1, terms=0) == pytest.approx(expected)
    assert predict(costs, g["wall"], g["starts"], kills=0, terms=0) is None, "no preemption, nothing to predict"
    assert predict(Costs(1.0, None, 5.0, 1.0), 100.0, 2, 1, 0) is None, "no interval measured"


def test_the_simulate_command_does_not_import_torch() -> None:
    """`prefix --help` builds every command's parser: the schedule and its model must not pull torch in."""
    code = "import sys, prefix.cli; prefix.cli.parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
