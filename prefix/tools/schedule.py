"""Preemptions on a schedule, and the goodput the Young–Daly model predicts for them.

`prefix simulate --preempt-every S` plays a preemption every S seconds (each gap drawn in
S·[1 − jitter, 1 + jitter]) until the run completes, as a spot market or a busy cluster would:
`term` sends SIGTERM to the pod's PID 1 and SIGKILLs what is left after the grace period, `kill`
SIGKILLs the whole start without warning, `mix` draws one of the two per preemption (shuffled
pairs, seeded). A start is never preempted before its first step, so every start makes progress.

What the run spent is read back from its own files: the save cost C (metrics/checkpoint.jsonl),
the interval T actually kept between saves, the restart R (launch to first step, from the ledger,
metrics/time.jsonl); `predict` puts them into `interval.lost_share`, the model auto's interval
rests on, so the measured goodput can be held against it.
"""

from __future__ import annotations

import random
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

from prefix.runs import read_jsonl
from prefix.tools.chaos import SAVED, START_TIMEOUT, ChaosError
from prefix.tools.processes import Launch

KINDS = ("term", "kill", "mix")
SPREAD = (0.125, 0.375, 0.625, 0.875)
"""Each round of four gaps takes these points of the jitter range in shuffled order: even a few
preemptions cover the range (kills land at spread-out moments of the checkpoint interval)."""


@dataclass(frozen=True)
class Schedule:
    every_s: float
    kind: str = "term"
    jitter: float = 0.0
    seed: int = 0
    limit: int | None = None
    """At most this many preemptions; None: until the run completes."""

    def __iter__(self) -> Iterator[tuple[float, str]]:
        """(seconds after the previous preemption, or the first launch; "term" or "kill")."""
        rng, n = random.Random(self.seed), 0
        while self.limit is None or n < self.limit:
            kinds = rng.sample(("term", "kill"), 2) if self.kind == "mix" else [self.kind] * 2
            for i, u in enumerate(rng.sample(SPREAD, len(SPREAD))):
                if self.limit is not None and n >= self.limit:
                    return
                yield self.every_s * (1 + self.jitter * (2 * u - 1)), kinds[i % 2]
                n += 1


@dataclass
class Preemption:
    kind: str
    after_s: float
    """Seconds after the previous preemption (or the first launch)."""
    at: float
    """When (epoch seconds)."""
    flushed: bool = False
    """A SIGTERM whose final checkpoint was written inside the grace period."""
    code: int | None = None
    """The start's exit code; None: SIGKILLed (at once, or at the end of the grace period)."""


def wait_exit(launch: Launch, timeout: float) -> bool:
    return launch.wait_for(lambda: False, timeout, every=0.05) == "exit"


def preempt(launch: Launch, kind: str, grace: float) -> tuple[bool, int | None]:
    """(flushed, exit code): SIGTERM to PID 1 then up to `grace` seconds (the caller's `with` kills what is
    left, as the kubelet's SIGKILL), or SIGKILL of every process of the start at once."""
    if kind == "kill":
        launch.kill()
        return False, None
    launch.proc.send_signal(signal.SIGTERM)
    exited = wait_exit(launch, grace)
    flushed = exited and any(e["event"] == SAVED for e in launch.events.read())
    return flushed, launch.proc.returncode if exited else None


def play(start: Callable[[], Launch], schedule: Schedule, grace: float, end: Callable[[Launch], None],
         echo: Callable[[str], None] = print) -> list[Preemption]:
    """Start, preempt on the schedule, start again; `end(launch)` gets the start that ended by itself or came
    after the schedule's last preemption."""
    done: list[Preemption] = []
    plan, since = iter(schedule), time.monotonic()
    while True:
        planned = next(plan, None)
        with start() as launch:
            if planned is None:
                end(launch)
                return done
            if launch.wait_for(launch.steps, START_TIMEOUT) == "timeout":
                raise ChaosError(f"{launch.log}: no training step within {START_TIMEOUT:.0f} s of a start")
            gap, kind = planned
            if launch.proc.poll() is not None or wait_exit(launch, since + gap - time.monotonic()):
                end(launch)
                return done
            after, since = time.monotonic() - since, time.monotonic()
            p = Preemption(kind, after, time.time(), *preempt(launch, kind, grace))
        done.append(p)
        what = "SIGKILL" if kind == "kill" else \
            f"SIGTERM, {'flushed' if p.flushed else 'SIGKILLed'} in grace, exit {'-' if p.code is None else p.code}"
        echo(f"preemption {len(done)} after {after:.1f} s: {what}")


def killed(done: list[Preemption]) -> dict[int, float]:
    """Start index → when it was SIGKILLed, for `account(killed=…)` (the i-th preemption ended the i-th start)."""
    return {i: p.at for i, p in enumerate(done) if p.kind == "kill"}


@dataclass
class Costs:
    """What the run's own files say its saves and restarts cost (seconds)."""

    save_s: float | None
    """C: the median stall of a periodic save."""
    interval_s: float | None
    """T: the median time between two saves of one start."""
    restart_s: float
    """R: launch to first step (start-up and lease wait), the mean over the starts."""
    final_s: float | None
    """F: the median stall of a synchronous save, what a SIGTERM's final checkpoint costs."""

    def __str__(self) -> str:
        show = lambda s: "-" if s is None else f"{s:.2f} s"  # noqa: E731
        return f"save {show(self.save_s)} every {show(self.interval_s)}, restart {show(self.restart_s)}"


def measure(run_dir: Path, goodput: dict[str, Any], restarts: range | None = None) -> Costs:
    """C, T, F from metrics/checkpoint.jsonl and R from `goodput` (`account` over the same `restarts`)."""
    metrics = run_dir / "metrics"
    saves = [s for s in read_jsonl(metrics / "checkpoint.jsonl") if s.get("ok", True)]
    ledger = read_jsonl(metrics / "time.jsonl")
    starts = sorted((line for line in ledger if line.get("event") == "start"), key=lambda s: s["restart"])
    asynchronous = any(s.get("async") for s in saves)
    periodic = [s for s in saves if s.get("async") or not asynchronous]
    final = [s["stall_s"] for s in saves if not s.get("async")]
    gaps: list[float] = []
    for this, after in pairwise([*starts, None]):
        if restarts is not None and this["restart"] not in restarts:
            continue
        until = after["process_start"] if after else float("inf")
        mine = [s for s in periodic if this["time"] <= s["time"] < until]
        last_step = max((line["step"] for line in ledger if line.get("restart") == this["restart"]), default=None)
        if mine and not asynchronous and mine[-1]["step"] == last_step:
            mine = mine[:-1]  # the final save at a stop: a partial interval
        gaps += [b["time"] - a["time"] for a, b in pairwise(mine)]
    n = goodput["starts"] or 1
    stalls = [s["stall_s"] for s in periodic]
    return Costs(statistics.median(stalls) if stalls else None, statistics.median(gaps) if gaps else None,
                 (goodput["parts"]["startup"] + goodput["parts"]["lease"]) / n,
                 statistics.median(final) if final else None)


def predict(costs: Costs, wall_s: float, starts: int, kills: int, terms: int) -> float | None:
    """Goodput by `interval.lost_share` for `starts` starts over `wall_s` seconds with these preemptions; None
    without a preemption or two saves in one start."""
    # imported here: the prefix.checkpoint package imports torch, which `prefix --help` must not wait for
    from prefix.checkpoint.interval import lost_share

    preemptions = kills + terms
    if not preemptions or costs.save_s is None or costs.interval_s is None:
        return None
    restart = (costs.restart_s * starts + (costs.final_s or 0.0) * terms) / preemptions
    return 1 - lost_share(costs.save_s, costs.interval_s, restart, wall_s / preemptions, kills / preemptions)
