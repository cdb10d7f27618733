"""Structured logs and metrics files.

Logs go through structlog: JSON lines in `logs/rank{r}.jsonl` for machines, readable lines on
stderr for people (rank 0 only, other ranks show warnings and errors). Metrics are JSON lines in
`metrics/<split>.jsonl`, each with `step` and a wall-clock `time`, written by rank 0, and
optionally TensorBoard events in `tb/` (docs/metrics.md). On a terminal, rank 0 also shows a
progress bar; in a pod (stderr is no terminal) there are log lines only. Both files are appended
through an `Appender`, so a full or failing volume costs log lines, never training.
"""

from __future__ import annotations

import atexit
import json
import logging
import numbers
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from prefix.appender import Appender, log_report


class _Console:
    """stderr for console lines; while a progress bar is shown, each line is printed above it."""

    def __init__(self) -> None:
        self.bar: Any = None

    def write(self, text: str) -> None:
        if self.bar is None:
            sys.stderr.write(text)
        else:
            self.bar.write(text.rstrip("\n"), file=sys.stderr)

    def flush(self) -> None:
        sys.stderr.flush()


_console = _Console()
_UNDER_BAR = {"step"}
"""Events the progress bar shows instead of a console line (they still go to the JSON log)."""


class _Tee:
    """Final structlog processor: append JSON to a file, return a console line for stderr.

    The file's own failures cannot be logged through structlog (they would come back here): they
    are printed on stderr and queued as JSON lines behind the lines they held up.
    """

    def __init__(self, path: str | None, rank: int, console_level: int):
        self.path, self.rank, self.console_level = path, rank, console_level
        self.json = structlog.processors.JSONRenderer()
        self.console = structlog.dev.ConsoleRenderer(colors=False)
        self.stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
        self.sink = Appender("logs", self._report) if path is not None else None

    def __call__(self, logger: Any, method: str, event: dict[str, Any]) -> str:
        if self.sink is not None:
            self.sink.append(self.path, self.json(logger, method, dict(event)))
        if logging.getLevelName(method.upper()) < self.console_level:
            raise structlog.DropEvent
        if _console.bar is not None and event.get("event") in _UNDER_BAR:
            raise structlog.DropEvent
        return self.console(logger, method, event)

    def _report(self, level: str, event: str, fields: dict[str, Any]) -> None:
        entry = self.stamp(None, level, {"event": event, **fields, "rank": self.rank, "level": level})
        if logging.getLevelName(level.upper()) >= self.console_level:
            _console.write(self.console(None, level, dict(entry)) + "\n")
            _console.flush()
        self.sink.append(self.path, self.json(None, level, entry))


_tee: _Tee | None = None


def setup_logging(rank: int, log_dir: Path | None = None) -> structlog.stdlib.BoundLogger:
    """Configure structlog for this process; call again once the run directory exists.

    The log file is closed (what waits in its backlog written if it can be) when this is called
    again and at exit."""
    global _tee
    if _tee is not None and _tee.sink is not None:
        _tee.sink.close()
    _tee = _Tee(f"{log_dir}/rank{rank}.jsonl" if log_dir is not None else None, rank,
                logging.INFO if rank == 0 else logging.WARNING)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _tee,
        ],
        logger_factory=structlog.PrintLoggerFactory(_console),
        cache_logger_on_first_use=False,
    )
    return structlog.get_logger().bind(rank=rank)


@atexit.register
def _close_log() -> None:
    if _tee is not None and _tee.sink is not None:
        _tee.sink.close()


class Progress:
    """A tqdm step bar on stderr, shown by rank 0 when `mode` is `always`, or `auto` on a terminal.

    Loss and tokens/s join the bar at every logged step, in place of the console's step lines.
    """

    def __init__(self, mode: str, is_main: bool, total: int, initial: int):
        self.bar: Any = None
        if is_main and (mode == "always" or (mode == "auto" and sys.stderr.isatty())):
            from tqdm import tqdm

            self.bar = _console.bar = tqdm(total=total, initial=initial, unit="step", file=sys.stderr,
                                           dynamic_ncols=True, smoothing=0.1)

    def update(self, step: int, **postfix: Any) -> None:
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = _console.bar = None


class _TensorBoard:
    """Scalars as TensorBoard events in `folder`, from any thread (the system sampler's too).

    SummaryWriter serialises an event and queues it; its own thread writes the file (flushed every
    10 s and at close), so the step loop pays microseconds. The writer opens at the first value,
    with `purge_step` when known: TensorBoard then drops a previous start's events from that step on,
    the steps a resume redoes. A failure turns TensorBoard off, never training.
    """

    def __init__(self, folder: Path, writer_class: Any):
        self.folder, self._writer_class = folder, writer_class
        self._writer: Any = None
        self._lock = threading.Lock()  # SummaryWriter reopens itself when used after close()
        self._off = self._failed = False
        self.purge_step: int | None = None

    def scalars(self, prefix: str, step: int, values: dict[str, Any]) -> None:
        numeric = {k: float(v) for k, v in values.items() if isinstance(v, numbers.Real) and not isinstance(v, bool)}
        with self._lock:
            if self._off or not numeric:
                return
            try:
                if self._writer is None:
                    self._writer = self._writer_class(str(self.folder), max_queue=1000, flush_secs=10,
                                                        purge_step=self.purge_step)
                for name, value in numeric.items():
                    self._writer.add_scalar(f"{prefix}/{name}", value, step)
            except Exception as e:
                self._off = self._failed = True
                structlog.get_logger().warning("tensorboard: writing events failed; tb/ is no longer written",
                                               folder=str(self.folder), error=f"{type(e).__name__}: {e}")

    def close(self) -> None:
        with self._lock:
            self._off = True
            if self._writer is not None:
                try:
                    self._writer.close()  # flushes; raises what its thread hit (a full disk)
                except Exception as e:
                    if not self._failed:  # else already said
                        structlog.get_logger().warning("tensorboard: closing the event file failed",
                                                       folder=str(self.folder), error=f"{type(e).__name__}: {e}")


def _summary_writer() -> Any:
    """torch's SummaryWriter, or None when the tensorboard package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # ImportError, or a tensorboard/protobuf mismatch: no events, training goes on
        return None
    return SummaryWriter


class Metrics:
    """Appends metric records to `metrics/<split>.jsonl` (only where enabled: rank 0).

    With `tensorboard` (and the tensorboard package installed), every numeric value also becomes
    the scalar `<split>/<name>` at `step` in `tb_folder` (default: `tb/` beside `metrics/`). Lines go
    through an Appender: a full volume delays or drops them, never raises; `before_write` (settable
    later) is called before every append.
    """

    def __init__(self, folder: Path, enabled: bool, tensorboard: bool = False, tb_folder: Path | None = None,
                 before_write: Callable[[], None] | None = None):
        self.folder = folder
        self.enabled = enabled
        self.sink = Appender("metrics", log_report(), before_write=before_write)
        writer_class = _summary_writer() if enabled and tensorboard else None
        self._tb = _TensorBoard(tb_folder or folder.parent / "tb", writer_class) if writer_class else None

    @property
    def before_write(self) -> Callable[[], None] | None:
        return self.sink.before_write

    @before_write.setter
    def before_write(self, hook: Callable[[], None] | None) -> None:
        self.sink.before_write = hook

    def write(self, split: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        self.sink.append(f"{self.folder}/{split}.jsonl", json.dumps({"step": step, "time": time.time(), **values}))
        self.scalars(split, step, values)

    def starting_at(self, step: int) -> None:
        """This start trains the steps after `step`: TensorBoard hides a previous start's events past it."""
        if self._tb is not None:
            self._tb.purge_step = step + 1

    def scalars(self, prefix: str, step: int, values: dict[str, Any]) -> None:
        """TensorBoard only (thread-safe): `<prefix>/<name>` for each numeric value."""
        if self.enabled and self._tb is not None:
            self._tb.scalars(prefix, step, values)

    def close(self) -> None:
        self.sink.close()
        if self._tb is not None:
            self._tb.close()
