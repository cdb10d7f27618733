"""Goodput: where a run's wall-clock time went, across all its starts.

Rank 0 keeps a ledger per start (`metrics/time.jsonl`): one `start` line (when the start was
launched, `launched()`, and when the loop began) and, at every logged step and at the end, the seconds spent since
the previous line training, evaluating and checkpointing. `account()` reads the ledger of every
start and splits the time the job held its machines into start-up, waiting for the run's lease (another start
still held it: flushing its final checkpoint, or killed and not yet lapsed), productive training (steps
that were kept), training redone (steps past the checkpoint the next start resumed from),
evaluation, checkpoint stalls and the rest (logging, waiting on peers): the parts sum to the wall
time by construction, and the rest should stay small. Time between starts (a pod pending) is
reported as `down`, outside the wall time. A start killed without warning is counted up to its
last ledger line: the steps after it are neither seen nor counted.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import psutil

from prefix.errors import EXIT_DIR
from prefix.runs import read_jsonl

SPENT = ("train", "eval", "checkpoint")
PARTS = ("startup", "lease", "productive", "redone", "eval", "checkpoint", "other")


def launched() -> float:
    """When this start was launched: this process's creation or, for the first workers of a torchrun agent,
    the agent's (and that of `prefix launch` above it), whose start-up is this start's too."""
    me = psutil.Process()
    first = me.create_time()
    if os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":  # a restarted worker group: the agent is older
        with suppress(psutil.Error):
            agent = me.parent()
            first = min(first, agent.create_time())
            if os.environ.get(EXIT_DIR):
                first = min(first, agent.parent().create_time())
    return first


class Ledger:
    """This start's time, by activity; `write(values)` appends a line (rank 0's metrics)."""

    def __init__(self, write: Any, restart: int, lease_wait_s: float = 0.0):
        self._write, self.restart, self.lease_wait_s = write, restart, lease_wait_s
        self._spent = dict.fromkeys(SPENT, 0.0)

    @contextmanager
    def spend(self, activity: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._spent[activity] += time.perf_counter() - start

    def opened(self, step: int) -> None:
        self._write(step, {"event": "start", "restart": self.restart,
                           "process_start": launched(), "lease_wait": self.lease_wait_s})

    def flush(self, step: int) -> None:
        self._write(step, {"restart": self.restart, **self._spent})
        self._spent = dict.fromkeys(SPENT, 0.0)


def account(metrics: Path, restarts: range | None = None, killed: dict[int, float] | None = None) -> dict[str, Any]:
    """{"wall", "down", "goodput", "parts": {part: seconds}, "starts": n} from metrics/time.jsonl.

    `restarts`: only the starts with these indices (0 is the first), e.g. a steady state without the
    first start; what a start kept is still judged by the start after it. `killed`: start index → when
    a harness SIGKILLed it (epoch seconds): its time after the last ledger line, the step in progress,
    is redone work the ledger cannot see."""
    starts: dict[int, dict[str, Any]] = {}
    lines: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for line in read_jsonl(metrics / "time.jsonl"):
        if line.get("event") == "start":
            starts[line["restart"]] = line
        elif line.get("restart") in starts:
            lines[line["restart"]].append(line)
    parts = dict.fromkeys(PARTS, 0.0)
    wall = down = 0.0
    order = sorted(starts)
    previous_end = None
    for i, restart in enumerate(order):
        if restarts is not None and restart not in restarts:
            continue
        start = starts[restart]
        kept_until = starts[order[i + 1]]["step"] if i + 1 < len(order) else float("inf")
        end = max([start["time"], *(line["time"] for line in lines[restart])])
        unseen = max(0.0, (killed or {}).get(restart, end) - end)
        parts["redone"] += unseen
        end += unseen
        waited = float(start.get("lease_wait") or 0.0)
        parts["lease"] += waited
        parts["startup"] += start["time"] - start["process_start"] - waited
        step = start["step"]
        for line in lines[restart]:
            steps = line["step"] - step
            kept = 1.0 if steps <= 0 else min(max(kept_until - step, 0), steps) / steps
            parts["productive"] += line["train"] * kept
            parts["redone"] += line["train"] * (1 - kept)
            parts["eval"] += line["eval"]
            parts["checkpoint"] += line["checkpoint"]
            step = line["step"]
        lifetime = end - start["process_start"]
        wall += lifetime
        if previous_end is not None:
            down += max(0.0, start["process_start"] - previous_end)
        previous_end = end
    parts["other"] = wall - sum(parts[p] for p in PARTS if p != "other")
    return {"wall": wall, "down": down, "goodput": parts["productive"] / wall if wall else None,
            "parts": parts, "starts": sum(1 for r in order if restarts is None or r in restarts)}


def working_seconds(metrics: Path) -> float | None:
    """The run's time in its step loops so far (wall less start-ups and lease waits); None without a ledger."""
    g = account(metrics)
    return g["wall"] - g["parts"]["startup"] - g["parts"]["lease"] if g["wall"] else None


def describe(result: dict[str, Any]) -> str:
    if not result["wall"]:
        return "goodput     not measured (no metrics/time.jsonl yet)"
    shares = ", ".join(f"{p} {100 * s / result['wall']:.1f} %" for p, s in result["parts"].items())
    return (f"goodput     {100 * result['goodput']:.1f} % of {result['wall'] / 3600:.2f} h over "
            f"{result['starts']} start(s) ({shares}); down between starts {result['down'] / 3600:.2f} h")
