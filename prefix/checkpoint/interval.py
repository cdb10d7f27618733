"""`checkpoint.every_seconds: auto`: how often to checkpoint, from what this run has seen.

Young (1974) and Daly (2006): with a checkpoint costing C seconds of lost training and failures
arriving every M seconds on average, the interval that loses the least time is about
sqrt(2 × C × M). C is the step loop's stall per save (measured, `metrics/checkpoint.jsonl`; with
asynchronous saves the write itself is not lost time); M is the run's observed training time per
failure that lost work (`meta/starts.jsonl` and the goodput ledger): a kill without a final checkpoint
or a crash. A SIGTERM that wrote its final checkpoint redoes nothing, whatever the interval, so it is
not counted; nor is the time spent starting (a restart is lost whatever the interval, and counting it
would stretch M). The result is bounded by `checkpoint.min_seconds` and `checkpoint.max_seconds`;
with no failure seen yet, M is unknown and the interval is the maximum.

`lost_share` is the model behind it, used to predict a run's goodput (`prefix simulate
--preempt-every`, bench/goodput.py): what share of the wall-clock time saves, restarts and redone
work take for a given interval.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from prefix.runs.layout import PREVIOUS_END, UNKNOWN_END

FAILURES = {PREVIOUS_END["crashed"], PREVIOUS_END["running"], UNKNOWN_END}
"""`previous_end` values of a start whose predecessor lost the work since its last save."""
RECENT = 5
"""Saves whose stall makes the cost estimate (the median, so one slow save does not swing it)."""


def young_daly(cost_s: float, mtbf_s: float, low: float, high: float) -> float:
    return min(high, max(low, math.sqrt(2 * cost_s * mtbf_s)))


def lost_share(cost_s: float, interval_s: float, restart_s: float, mtbf_s: float, kill_share: float = 1.0) -> float:
    """The share of wall-clock time not spent on training that is kept (1 − goodput), to first order.

    A preemption every `mtbf_s` (M) costs the restart R (launch to first step, plus the final save when
    it came as a SIGTERM) and, for the `kill_share` of them that are SIGKILLs, the work since the last
    save: half an interval T on average (kills at random moments). The M − R seconds between restarts
    lose C per save every T. Minimal where T = sqrt(2·C·(M − R)/kill_share): Young–Daly's sqrt(2·C·M)
    when R ≪ M and every failure is a kill; a SIGTERM with a final checkpoint redoes nothing.
    """
    saving = max(mtbf_s - restart_s, 0.0) * cost_s / interval_s
    return min(1.0, (restart_s + kill_share * interval_s / 2 + saving) / mtbf_s)


def mean_time_between_failures(starts: list[dict[str, Any]], working_s: float | None = None) -> tuple[float | None, int]:
    """(Seconds of training per failure that lost work, failures); None before any failure.

    `working_s`: the run's time in its step loops so far (`goodput.account`'s wall less start-ups and lease
    waits); without it, the span from the first start to the latest, which also holds the restarts and the
    time a preempted pod waited to be scheduled again (an overestimate: fewer checkpoints).
    """
    failures = sum(1 for s in starts[1:] if s.get("previous_end") in FAILURES)
    if not failures:
        return None, 0
    span = float(starts[-1]["time"]) - float(starts[0]["time"])
    return (span if working_s is None else working_s) / failures, failures


@dataclass
class AutoInterval:
    low: float
    high: float
    mtbf_s: float | None
    failures: int
    costs: list[float]

    @classmethod
    def of(cls, low: float, high: float, starts: list[dict[str, Any]], saves: list[dict[str, Any]],
           working_s: float | None = None) -> AutoInterval:
        """From the restart history, the recorded saves (`metrics/checkpoint.jsonl` lines) and the training time."""
        mtbf, failures = mean_time_between_failures(starts, working_s)
        costs = [float(s["stall_s"]) for s in saves if s.get("ok", True) and "stall_s" in s]
        return cls(low, high, mtbf, failures, costs[-RECENT:])

    @property
    def cost_s(self) -> float | None:
        return statistics.median(self.costs) if self.costs else None

    def seconds(self) -> float:
        """The interval now: the minimum until a save was measured, the maximum before any failure."""
        if self.cost_s is None:
            return self.low
        if self.mtbf_s is None:
            return self.high
        return young_daly(self.cost_s, self.mtbf_s, self.low, self.high)

    def observe(self, stall_s: float) -> None:
        self.costs = [*self.costs, stall_s][-RECENT:]

    def inputs(self) -> dict[str, Any]:
        """What the choice rests on, for the log line at each start."""
        return {"every_seconds": round(self.seconds(), 1), "save_cost_s": self.cost_s and round(self.cost_s, 3),
                "mtbf_s": self.mtbf_s and round(self.mtbf_s, 1), "failures": self.failures,
                "min_seconds": self.low, "max_seconds": self.high}
