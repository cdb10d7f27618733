"""The chaos harness against the real daemon: kills of every kind, then bitwise the uninterrupted run."""

from __future__ import annotations

import random
import sys

from helpers import TINY, run

from prefix.tools import chaos
from prefix.tools.chaos_report import LOSS_TOLERANCE

STEPS = 400
BITWISE = [kind for kind in chaos.KINDS if kind != "resize"]  # every kind that keeps the world size


def test_kill_plan_uses_every_kind_in_random_order() -> None:
    plans = [chaos.kill_plan(8, chaos.KINDS, random.Random(seed)) for seed in range(5)]
    assert all(set(plan) == set(chaos.KINDS) and len(plan) == 8 for plan in plans)
    assert len({tuple(plan) for plan in plans}) > 1


def test_random_kills_of_every_kind_leave_the_run_bitwise_identical(tmp_path) -> None:
    """Kills of every kind but resize, the faults between pods included: a second start while one is live,
    a frozen start woken after a replacement took the run over."""
    report = chaos.play(TINY, kills=len(BITWISE), seed=1, runs_root=tmp_path, kinds=BITWISE,
                        overrides=(f"trainer.max_steps={STEPS}",))
    print(report)
    made = report.by_kind()
    assert len(report.kills) == sum(made.values()) == len(BITWISE), "the run finished before every kill was made"
    assert all(made[kind] >= 1 for kind in BITWISE), made
    landed = report.by_kind(landed_only=True)
    assert landed["double-start"] == 1 and landed["zombie"] == 1, report  # refused with 2; fenced, wrote nothing
    assert report.zombie_writes == 0
    assert report.cycles == len(report.kills) + 1
    assert 1 <= report.resumes < report.cycles
    assert report.unreadable == 0, "a checkpoint was found unusable at resume"
    assert report.losses_identical and report.steps == STEPS
    assert report.weights_identical
    assert report.ok


def test_starts_on_other_numbers_of_ranks_see_every_sample_once_and_keep_the_loss_curve(tmp_path) -> None:
    report = chaos.play(TINY, kills=2, seed=2, runs_root=tmp_path, kinds=["resize"],
                        overrides=(f"trainer.max_steps={STEPS}",))
    print(report)
    assert [k.kind for k in report.kills] == ["resize", "resize"] and all(k.landed for k in report.kills), report
    assert report.resized and report.samples_once, "every sample of each epoch once, the uninterrupted run's"
    assert report.loss_gap is not None and report.loss_gap <= LOSS_TOLERANCE
    assert report.ok


def test_bad_argument_is_one_line_with_exit_code_2() -> None:
    for args in (["--kills", "many"], ["--frobnicate"], ["--kills", "-1"], ["trainer.max_stepz=3"],
                 ["--kinds", "sigterm,meteor"]):
        result = run([sys.executable, "-m", "prefix.cli", "chaos", *args], timeout=60)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
