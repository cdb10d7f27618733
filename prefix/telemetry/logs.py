"""Structured logs and the progress bar.

Logs go through structlog: JSON lines in `logs/rank{r}.jsonl` for machines, readable lines on
stderr for people (rank 0 only, other ranks show warnings and errors). On a terminal, rank 0 also
shows a progress bar; in a pod (stderr is no terminal) there are log lines only. The file is
appended through an `Appender`, so a full or failing volume costs log lines, never training.
"""

from __future__ import annotations

import atexit
import logging
import sys
from pathlib import Path
from typing import Any

import structlog

from prefix.appender import Appender


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
