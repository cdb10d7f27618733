"""Metrics: JSON lines in `metrics/<split>.jsonl` (the run's record), then every experiment tracker.

Each line has `step` and a wall-clock `time`; rank 0 writes them through an `Appender`, so a full
volume delays or drops lines, never training. The same values go to each tracker's relay (see
`trackers`): queued here, delivered by the relay's thread.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prefix.appender import Appender, log_report
from prefix.telemetry.trackers import (
    CLOSE_S,
    RESTART,
    SPLITS,
    Cursor,
    Record,
    Relay,
    RunInfo,
    Tracker,
    numeric,
)

PENDING = 10_000
"""Records kept for the trackers before `start` (what the trackers need is known only then)."""


class Metrics:
    """Appends metric records to `metrics/<split>.jsonl` and hands them to the trackers (only where
    enabled: rank 0). `before_write` (settable later) is called before every write into the run."""

    def __init__(self, folder: Path, enabled: bool, trackers: Sequence[Tracker] = (),
                 before_write: Callable[[], None] | None = None):
        self.folder, self.enabled = folder, enabled
        self.sink = Appender("metrics", log_report(), before_write=before_write)
        self.trackers = list(trackers) if enabled else []
        self._relays: list[Relay] = []
        self._pending: list[Record] | None = []
        self._last: dict[str, dict[str, Any]] = {}

    @property
    def before_write(self) -> Callable[[], None] | None:
        return self.sink.before_write

    @before_write.setter
    def before_write(self, hook: Callable[[], None] | None) -> None:
        self.sink.before_write = hook

    def start(self, run: RunInfo) -> None:
        """Open the trackers for this start (in their threads) and send the restart event."""
        if not self.trackers or self._relays:
            return
        cursor = Cursor(run.path / "meta" / "trackers.json", self.before_write)
        self._relays = [Relay(t, cursor, self.folder) for t in self.trackers]
        restart = Record(RESTART, run.start_step, {"restart": run.restarts, **run.start}, time.time())
        for relay in self._relays:
            relay.start(run)
            for record in [*(self._pending or []), restart]:
                relay.put(record)
        self._pending = None

    def write(self, split: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        now = time.time()
        self.sink.append(f"{self.folder}/{split}.jsonl", json.dumps({"step": step, "time": now, **values}))
        self._last[split] = values
        if split in SPLITS:  # not `time`, the goodput ledger's bookkeeping (process_start, …)
            self._send(Record(split, step, values, now))

    def scalars(self, split: str, step: int, values: dict[str, Any]) -> None:
        """Trackers only (thread-safe): values whose line another writer keeps (the system sampler)."""
        if self.enabled:
            self._send(Record(split, step, values, time.time()))

    def summary(self) -> dict[str, float]:
        """The last train and eval values of this start: a completed run's final metrics."""
        return {f"{split}/{k}": v for split in ("train", "eval") for k, v in numeric(self._last.get(split, {})).items()}

    def close(self, summary: dict[str, float] | None = None, artifacts: list[Path] | None = None) -> None:
        """Flush the lines; give the trackers `CLOSE_S` together to take what is queued (and, when the run
        completed, its `summary` and report `artifacts`)."""
        self.sink.close()
        deadline = time.monotonic() + CLOSE_S
        for relay in self._relays:
            relay.close(deadline, summary, artifacts)
        for relay in self._relays:
            relay.join(deadline)
        self._relays = []

    def _send(self, record: Record) -> None:
        if self._pending is not None:
            if self.trackers and len(self._pending) < PENDING:
                self._pending.append(record)
            return
        for relay in self._relays:
            relay.put(record)
