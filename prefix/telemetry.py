"""Structured logs and metrics files.

Logs go through structlog: JSON lines in `logs/rank{r}.jsonl` for machines, readable lines on
stderr for people (rank 0 only, other ranks show warnings and errors). Metrics are JSON lines in
`metrics/<split>.jsonl`, each with `step` and a wall-clock `time`, written by rank 0.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import structlog


class _Tee:
    """Final structlog processor: append JSON to a file, return a console line for stderr."""

    def __init__(self, file: TextIO | None, console_level: int):
        self.file = file
        self.console_level = console_level
        self.json = structlog.processors.JSONRenderer()
        self.console = structlog.dev.ConsoleRenderer(colors=False)

    def __call__(self, logger: Any, method: str, event: dict[str, Any]) -> str:
        if self.file is not None:
            self.file.write(self.json(logger, method, dict(event)) + "\n")
            self.file.flush()
        if logging.getLevelName(method.upper()) < self.console_level:
            raise structlog.DropEvent
        return self.console(logger, method, event)


def setup_logging(rank: int, log_dir: Path | None = None) -> structlog.stdlib.BoundLogger:
    """Configure structlog for this process; call again once the run directory exists."""
    file = None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        file = open(log_dir / f"rank{rank}.jsonl", "a", buffering=1)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _Tee(file, logging.INFO if rank == 0 else logging.WARNING),
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    return structlog.get_logger().bind(rank=rank)


class Metrics:
    """Appends metric records to `metrics/<split>.jsonl` (only where enabled: rank 0)."""

    def __init__(self, folder: Path, enabled: bool):
        self.folder = folder
        self.enabled = enabled
        self._files: dict[str, TextIO] = {}

    def write(self, split: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        if split not in self._files:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._files[split] = open(self.folder / f"{split}.jsonl", "a", buffering=1)
        record = {"step": step, "time": time.time(), **values}
        self._files[split].write(json.dumps(record) + "\n")

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
