"""The chaos harness against the real daemon: kills of every kind, then bitwise the uninterrupted run."""

from __future__ import annotations

import random
import sys

from helpers import TINY, run

from prefix.tools import chaos

STEPS = 150


def test_kill_plan_uses_every_kind_in_random_order() -> None:
    plans = [chaos.kill_plan(6, chaos.KINDS, random.Random(seed)) for seed in range(5)]
    assert all(set(plan) == set(chaos.KINDS) and len(plan) == 6 for plan in plans)
    assert len({tuple(plan) for plan in plans}) > 1


def test_random_kills_of_every_kind_leave_the_run_bitwise_identical(tmp_path) -> None:
    report = chaos.play(TINY, kills=6, seed=1, runs_root=tmp_path, overrides=(f"trainer.max_steps={STEPS}",))
    print(report)
    made = report.by_kind()
    assert len(report.kills) == sum(made.values()) == 6, "the run finished before every kill was made"
    assert all(made[kind] >= 1 for kind in chaos.KINDS), made
    assert report.cycles == len(report.kills) + 1
    assert 1 <= report.resumes < report.cycles
    assert report.unreadable == 0, "a checkpoint was found unusable at resume"
    assert report.losses_identical and report.steps == STEPS
    assert report.weights_identical
    assert report.ok


def test_bad_argument_is_one_line_with_exit_code_2() -> None:
    for args in (["--kills", "many"], ["--frobnicate"], ["--kills", "-1"], ["trainer.max_stepz=3"]):
        result = run([sys.executable, "-m", "prefix.cli", "chaos", *args], timeout=60)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
