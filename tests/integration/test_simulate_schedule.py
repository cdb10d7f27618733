"""`prefix simulate --preempt-every`: the Job's command preempted on a schedule, its goodput from the ledger."""

from __future__ import annotations

import subprocess
import sys

import pytest

from prefix.runs.goodput import PARTS
from prefix.tools import simulate
from prefix.tools.schedule import Schedule


def test_a_mixed_schedule_preempts_accounts_and_ends_bit_identical(tmp_path):
    plan = Schedule(every_s=6.0, kind="mix", jitter=0.5, seed=0, limit=2)  # one SIGTERM, one SIGKILL
    report = simulate.play(preemptions=2, seed=0, root=tmp_path, source="job", schedule=plan)
    print(report)
    assert report.preemptions == 2 and report.kills == 1, "the run finished before the schedule's preemptions"
    assert report.reschedules["same-node"] == 2
    assert report.flushed_in_grace == 1 and sorted(report.exit_codes, key=str) == [143, None]
    assert report.losses_identical and report.weights_identical and report.ok

    g = report.goodput
    assert g["starts"] == 3 and 0 < g["goodput"] <= 1
    assert sum(g["parts"][p] for p in PARTS) == pytest.approx(g["wall"])
    assert g["parts"]["startup"] > 0 and g["parts"]["productive"] > 0
    assert report.costs.save_s > 0 and report.costs.restart_s > 0
    assert report.predicted is not None and 0 < report.predicted <= 1
    text = str(report)
    assert "preemptions        2 (1 SIGKILL)" in text and "goodput " in text and "model " in text


@pytest.mark.parametrize("flags", [["--kind", "kill"], ["--preempt-every", "0"], ["--preempt-every", "9",
                                                                                  "--jitter", "1"]])
def test_a_bad_schedule_is_one_line_and_exit_2(flags, tmp_path):
    out = subprocess.run([sys.executable, "-m", "prefix.cli", "simulate", *flags, "--root", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.startswith("error: ") and len(out.stderr.splitlines()) == 1, out.stderr
    assert not any(tmp_path.iterdir()), "nothing ran"
