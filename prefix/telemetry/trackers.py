"""Experiment trackers (TensorBoard, W&B, MLflow), each fed by its own thread, never by the step loop.

The step loop only puts a `Record` on a queue. A `Relay` thread per tracker connects, finds the
tracker's run again (one tracker run per prefix run, across every restart), and delivers records
in batches. A tracker that is down is warned about once and retried with backoff while its queue
holds up to `BACKLOG` records; training never waits for it, so a run with an unreachable tracker
trains bit-identically to one without.

Steps redone after a kill are logged once: each relay keeps, per split, the highest step the
tracker holds (asked from the tracker where it can tell, else the cursor kept in
`meta/trackers.json`) and skips records at or below it. Those records hold the same loss as the
first attempt (the resume promise); only timings differ, and the tracker keeps the first ones.
Lines a previous start wrote to `metrics/*.jsonl` up to the resume point but never delivered (its
tracker was down) are delivered at open, so a tracker catches up with the run's files. See
docs/tracking.md.
"""

from __future__ import annotations

import collections
import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from prefix.runs.layout import read_jsonl, write_atomically

BACKLOG = 100_000
"""Records a relay holds while its tracker is down; beyond it the oldest are dropped (and counted)."""
BATCH = 1000
RETRY_S = (1.0, 60.0)
"""First and longest wait between attempts while a tracker is unreachable."""
CLOSE_S = 10.0
"""How long the end of a start waits for the trackers to take what is queued (inside the pod's grace)."""
SPLITS = ("train", "eval", "checkpoint", "samples", "system", "network")
"""The metrics/<split>.jsonl series trackers get (and catch up from). Not `time`: the goodput ledger's
bookkeeping is `prefix status`'s, not a curve to watch; system_rank<r> files of other ranks stay local."""
RESTART = "restart"
"""The split of the record each start sends: restarts appear as events in every tracker."""


@dataclass(frozen=True)
class Record:
    split: str
    step: int
    values: dict[str, Any]
    time: float


def numeric(values: dict[str, Any]) -> dict[str, float]:
    """The numeric values (bools and strings are not metrics)."""
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


@dataclass
class RunInfo:
    """What a tracker needs to find or create its run: the same for every start of a prefix run."""
    name: str
    path: Path
    experiment: str
    created: float
    """meta/run.json's `created`: with the name, it makes `uid`, the same on every start."""
    config: dict[str, Any]
    start_step: int = 0
    restarts: int = 0
    start: dict[str, Any] = field(default_factory=dict)
    """This start's line in meta/starts.jsonl (previous_end, steps_redone, host, …)."""

    @property
    def uid(self) -> str:
        """A stable id for the prefix run (W&B's run id, MLflow's `prefix.uid` tag)."""
        return hashlib.sha256(f"{self.name}\0{self.created!r}".encode()).hexdigest()[:16]


class Tracker:
    """One experiment tracker. Every method runs on the tracker's relay thread; raising means
    "not delivered, try again later" (the relay backs off and retries the same call), so a bad single
    value is skipped, not raised. Built by `prefix.telemetry.trackers_for` from `telemetry.<name>`.

    Records reaching `log` are deduped and in order per split. Splits: train, eval, checkpoint,
    system, network (numbers: use `numeric`), samples (values {"prompt", "text"}: text, not metrics)
    and `RESTART` (one per start, values {"restart": n, "time", "start_step", "world_size", "host",
    "previous_end", "steps_redone", "config_changes"}: an event). Metric names are `<split>/<name>`.
    """

    name = "tracker"
    keeps_files = True
    """Whether `finish` keeps the report's files: only then does a completed run write `report/` for it."""

    def open(self, run: RunInfo, saved: dict[str, Any]) -> dict[str, int]:
        """Connect and find or create THE tracker run of this prefix run (the same on every restart:
        `saved` is what `state()` returned at a previous start, {} at first; `run.uid` is stable), and
        log the resolved config the first time. Returns the highest step the tracker already holds per
        split where it can tell authoritatively (from its server); {} leaves the relay's cursor."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """JSON that lets the next start find the same tracker run (kept in meta/trackers.json)."""
        return {}

    def log(self, records: list[Record]) -> None:
        raise NotImplementedError

    def finish(self, summary: dict[str, float], artifacts: list[Path]) -> None:
        """The run completed: final metrics and the report's files."""

    def close(self) -> None:
        """This start ends; the tracker run stays open for the next start."""


class Cursor:
    """meta/trackers.json: per tracker, its state and the highest step delivered per split."""

    def __init__(self, path: Path, before_write: Callable[[], None] | None):
        self.path, self.before_write = path, before_write
        self._lock = threading.Lock()
        try:
            self.data: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            self.data = {}

    def of(self, name: str) -> dict[str, Any]:
        return dict(self.data.get(name) or {})

    def save(self, name: str, state: dict[str, Any], held: dict[str, int]) -> None:
        with self._lock:
            self.data[name] = {**state, "held": held}
            text = json.dumps(self.data, indent=2)
            if self.before_write is not None:
                self.before_write()
            try:
                write_atomically(self.path, text)
            except OSError as e:  # then a restart may log a batch twice, never lose it
                structlog.get_logger().warning("meta/trackers.json not written", error=str(e))


class Relay:
    """A tracker's queue and thread: open with retries, catch up, deliver batches, finish."""

    def __init__(self, tracker: Tracker, cursor: Cursor, metrics: Path):
        self.tracker, self.cursor, self.metrics = tracker, cursor, metrics
        self.log = structlog.get_logger().bind(tracker=tracker.name)
        self.queue: collections.deque[Record] = collections.deque(maxlen=BACKLOG)
        self.lines_before = {split: _size(metrics / f"{split}.jsonl") for split in SPLITS}
        self.held: dict[str, int] = {}
        self._prompts: dict[str, set[Any]] = {}  # the prompts sampled at the held step of `samples`
        self._opened_at: dict[str, int] = {}  # held at open: a step a previous start logged, all of it
        self.dropped = 0
        self._wake = threading.Condition()
        self._closing = False
        self._failing = False
        self._deadline = float("inf")
        self._closed = threading.Event()  # cuts a retry's wait short (not every put(), which would hammer)
        self._final: tuple[dict[str, float], list[Path]] | None = None
        self._thread: threading.Thread | None = None

    def start(self, run: RunInfo) -> None:
        self._thread = threading.Thread(target=self._run, args=(run,), name=f"tracker-{self.tracker.name}",
                                        daemon=True)
        self._thread.start()

    def put(self, record: Record) -> None:
        with self._wake:
            if len(self.queue) == BACKLOG:
                self.dropped += 1
            self.queue.append(record)
            self._wake.notify()

    def close(self, deadline: float, summary: dict[str, float] | None = None,
              artifacts: list[Path] | None = None) -> None:
        """Ask the thread to deliver what is queued (and `finish` when given a summary) by `deadline`
        (monotonic), retrying until then, and end."""
        with self._wake:
            self._closing, self._deadline = True, deadline
            self._final = (summary, artifacts or []) if summary is not None else None
            self._wake.notify()
        self._closed.set()

    def join(self, deadline: float) -> None:
        """Wait until `deadline` (monotonic) at most; what is left is said, and caught up by the next start."""
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
            if self._thread.is_alive():
                self.log.warning("tracker did not take everything before the end of this start; the next start "
                                 "delivers the rest from metrics/", queued=len(self.queue))

    # The relay's thread.

    def _run(self, run: RunInfo) -> None:
        if not self._attempt("open", lambda: self._open(run)):
            return
        while True:
            with self._wake:
                while not self.queue and not self._closing:
                    self._wake.wait()
                batch = [self.queue.popleft() for _ in range(min(BATCH, len(self.queue)))]
                last = not self.queue and self._closing
            self._deliver(batch)
            if last:
                break
        if self._final is not None:
            self._attempt("finish", lambda: self.tracker.finish(*self._final))
        self._attempt("close", self.tracker.close, tries=1)

    def _open(self, run: RunInfo) -> None:
        saved = self.cursor.of(self.tracker.name)
        told = self.tracker.open(run, saved)
        self.held = {**saved.get("held", {}), **told}  # what the tracker says beats our cursor
        self._opened_at = dict(self.held)
        self._deliver(list(self._earlier_lines(run.start_step)), save_always=True)

    def _earlier_lines(self, start_step: int) -> Iterable[Record]:
        """Lines of previous starts this tracker never got (it was down, or the start was killed), up to
        the step this start resumed from: the steps after it are this start's to log."""
        for split, size in self.lines_before.items():
            if size:
                for row in read_jsonl(self.metrics / f"{split}.jsonl")[:size]:
                    step = row.pop("step", None)
                    if isinstance(step, int) and self.held.get(split, -1) < step <= start_step:
                        yield Record(split, step, row, row.pop("time", 0.0))

    def _deliver(self, batch: list[Record], save_always: bool = False) -> None:
        fresh, seen, prompts = [], dict(self.held), {k: set(v) for k, v in self._prompts.items()}
        for r in batch:
            last = seen.get(r.split, -1)
            if r.split == RESTART:
                fresh.append(r)
            elif r.step > last:
                fresh.append(r)
                seen[r.split], prompts[r.split] = r.step, {r.values.get("prompt")}
            elif (r.split == "samples" and r.step == last and r.step != self._opened_at.get(r.split)
                  and r.values.get("prompt") not in prompts.get(r.split, {})):
                fresh.append(r)  # one sample per prompt at a step: a step's records, not a step again
                prompts.setdefault(r.split, set()).add(r.values.get("prompt"))
        if fresh and not self._attempt("log", lambda: self.tracker.log(fresh)):
            return  # closing and still down: not delivered, so not held; the next start catches up
        if fresh or save_always:
            self.held, self._prompts = seen, prompts
            self.cursor.save(self.tracker.name, self.tracker.state(), seen)
        if self.dropped:
            self.log.warning("tracker backlog full: oldest records dropped (still in metrics/)", dropped=self.dropped)
            self.dropped = 0

    def _attempt(self, what: str, call: Callable[[], Any], tries: int | None = None) -> bool:
        """Call until it succeeds, or until the close deadline passed (or `tries` ran out). An outage is said
        once, when it begins, and once more when the tracker works again."""
        wait, failures = RETRY_S[0], 0
        while True:
            try:
                call()
            except Exception as e:
                failures += 1
                if not self._failing:
                    self._failing = True
                    self.log.warning(f"tracker: {what} failed; training goes on, retrying",
                                     error=f"{type(e).__name__}: {e}"[:300])
                left = self._deadline - time.monotonic()
                if (tries is not None and failures >= tries) or left <= 0:
                    return False
                if self._closing:
                    time.sleep(min(wait, left))
                else:
                    self._closed.wait(wait)  # close() cuts it short
                wait = min(wait * 2, RETRY_S[1])
                continue
            if self._failing:
                self._failing = False
                self.log.info(f"tracker: {what} works again")
            return True


def _size(path: Path) -> int:
    """Lines in a metrics file now: the previous starts' part, which this start does not send again."""
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0
