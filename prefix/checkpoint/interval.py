"""`checkpoint.every_seconds: auto`: how often to checkpoint, from what this run has seen.

Young (1974) and Daly (2006): with a checkpoint costing C seconds of lost training and failures
arriving every M seconds on average, the interval that loses the least time is about
sqrt(2 × C × M). C is the step loop's stall per save (measured, `metrics/checkpoint.jsonl`; with
asynchronous saves the write itself is not lost time); M is the run's observed time between
preemptions or crashes (`meta/starts.jsonl`). The result is bounded by `checkpoint.min_seconds` and
`checkpoint.max_seconds`; with no failure seen yet, M is unknown and the interval is the maximum.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from prefix.runs.layout import PREVIOUS_END, UNKNOWN_END

FAILURES = {*PREVIOUS_END.values(), UNKNOWN_END} - {PREVIOUS_END["completed"]}
"""`previous_end` values of a start that followed a failure (not a run that finished and was extended)."""
RECENT = 5
"""Saves whose stall makes the cost estimate (the median, so one slow save does not swing it)."""


def young_daly(cost_s: float, mtbf_s: float, low: float, high: float) -> float:
    return min(high, max(low, math.sqrt(2 * cost_s * mtbf_s)))


def mean_time_between_failures(starts: list[dict[str, Any]]) -> tuple[float | None, int]:
    """(Seconds from the first start to the latest per failure, failures); None before any failure.

    The span includes the time a preempted pod waited to be scheduled again: M is slightly
    overestimated, which errs towards fewer checkpoints only while failures are rare.
    """
    failures = sum(1 for s in starts[1:] if s.get("previous_end") in FAILURES)
    if not failures:
        return None, 0
    return (float(starts[-1]["time"]) - float(starts[0]["time"])) / failures, failures


@dataclass
class AutoInterval:
    low: float
    high: float
    mtbf_s: float | None
    failures: int
    costs: list[float]

    @classmethod
    def of(cls, low: float, high: float, starts: list[dict[str, Any]], saves: list[dict[str, Any]]) -> AutoInterval:
        """From the restart history and the recorded saves (`metrics/checkpoint.jsonl` lines)."""
        mtbf, failures = mean_time_between_failures(starts)
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
