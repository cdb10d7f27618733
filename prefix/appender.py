"""Appending lines (logs, metrics) to files on a volume that may fill up or fail.

A log or metrics line is worth less than the training step that produced it and than the
checkpoint that saves it: a full volume must cost lines, never the run. One class does it for every
sink (the structlog file, metrics/, the system sampler), so they fail, wait and recover alike.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

RESERVE_BYTES = 64 << 20
"""Free space that log and metrics appends leave to checkpoints (5 % of a smaller volume)."""

Report = Callable[[str, str, dict[str, Any]], None]  # (level, event, fields): where an Appender says what happened


class Appender:
    """Appends lines to files (one sink: a log file, the metrics folder) so that a full or failing
    volume (ENOSPC, EDQUOT, EIO) never reaches training, and log growth never takes the space the
    next checkpoint needs.

    The first failed write is reported once (a warning naming the file and the error). Its line and
    the ones after it wait in a backlog bounded by `max_lines` and `max_bytes` (the oldest are
    dropped, and counted) and are retried, in order, at most every `retry_s`; when they land, one
    info line says how many came late and how many were lost. Appends also wait, without an OSError,
    while the volume has less free than the reserve (RESERVE_BYTES, or 5 % of a smaller volume),
    checked at most every `check_s` with fstatvfs: checkpoints are what a restart needs.

    Raw os.write on O_APPEND descriptors: no buffer keeps a failed line to write it twice. The rest
    of a line cut by a short write is retried as its continuation; a line after a torn one (its rest
    dropped, or cut by an earlier process) starts with a newline, so readers skip only the fragment.
    `before_write`, when set, is called before every append (run-lease fencing): it may raise.
    """

    def __init__(self, name: str, report: Report, *, before_write: Callable[[], None] | None = None,
                 retry_s: float = 5.0, check_s: float = 10.0, reserve_bytes: int = RESERVE_BYTES,
                 max_lines: int = 10_000, max_bytes: int = 4 << 20):
        self.name, self.report, self.before_write = name, report, before_write
        self.retry_s, self.check_s, self.reserve_bytes = retry_s, check_s, reserve_bytes
        self.max_lines, self.max_bytes = max_lines, max_bytes
        self._lock = threading.Lock()  # structlog's sink is shared by every thread
        self._fds: dict[str, int] = {}  # by file name: str hashes once, a Path at every call
        self._torn: set[str] = set()  # files whose last byte is not a newline
        self._backlog: deque[tuple[str, bytes, bool]] = deque()  # (file, bytes, continues a torn line)
        self._bytes = 0
        self._retry_at = self._check_at = 0.0  # time.monotonic()
        self._failing = self._warned = False
        self._late = self._lost = 0

    def append(self, path: str | os.PathLike[str], line: str) -> None:
        """Append `line` (without its newline) to `path`, now or later; never raises OSError."""
        if self.before_write is not None:
            self.before_write()
        data = (line + "\n").encode()
        with self._lock:
            self._backlog.append((os.fspath(path), data, False))
            self._bytes += len(data)
            while len(self._backlog) > 1 and (len(self._backlog) > self.max_lines or self._bytes > self.max_bytes):
                self._take()
                self._lost += 1
            now = time.monotonic()
            notes = self._flush(now, reserve=True) if now >= self._retry_at else []
        self._tell(notes)

    def close(self) -> None:
        """Write what waits (ignoring the reserve: the final checkpoint is done), then close the files.

        Appending again reopens them."""
        if self._backlog and self.before_write is not None:
            self.before_write()
        with self._lock:
            notes = self._flush(time.monotonic(), reserve=False) if self._backlog else []
            if self._backlog:
                lost, file = self._lost + len(self._backlog), self._backlog[0][0]
                while self._backlog:
                    self._take()
                self._late = self._lost = 0
                notes.append(("info", f"{self.name}: lines not written at exit", {"file": file, "lost": lost}))
        self._tell(notes)  # before the files close: the log file's own report goes into it
        with self._lock:
            for path in list(self._fds):
                self._close(path)

    def _flush(self, now: float, reserve: bool) -> list[tuple[str, str, dict[str, Any]]]:
        """Write the backlog in order until a write fails; returns what to report (outside the lock)."""
        check = reserve and (self._failing or now >= self._check_at)
        while self._backlog:
            path, data, rest = self._backlog[0]
            try:
                fd = self._open(path)
                if check:
                    check, self._check_at = False, now + self.check_s
                    self._check_reserve(fd)
                if path in self._torn and not rest:
                    data = b"\n" + data  # the fragment before it stays a line of its own
                self._write(fd, path, data)
            except OSError as e:
                self._close(path)  # reopened at the retry: a remount or a stale handle heals too
                return self._fail(path, e, now)
            self._take()
            if self._failing:
                self._late += 1
        if not self._failing:
            return []
        self._failing, self._retry_at = False, 0.0
        late, lost, self._late, self._lost = self._late, self._lost, 0, 0
        return [("info", f"{self.name}: writing again", {"file": path, "late": late, "lost": lost})]

    def _write(self, fd: int, path: str, data: bytes) -> None:
        """All of `data`, or raise with the unwritten rest at the head of the backlog."""
        while data:
            try:
                n = os.write(fd, data)
                if n == 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError:
                self._bytes += len(data) - len(self._backlog[0][1])
                self._backlog[0] = (path, data, path in self._torn)
                raise
            if data[n - 1:n] == b"\n":
                self._torn.discard(path)
            else:
                self._torn.add(path)
            data = data[n:]

    def _open(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":  # cut by a kill or a full disk before
                self._torn.add(path)
            self._fds[path] = fd
        return fd

    def _close(self, path: str) -> None:
        fd = self._fds.pop(path, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _check_reserve(self, fd: int) -> None:
        st = os.fstatvfs(fd)
        free, reserve = st.f_bavail * st.f_frsize, min(self.reserve_bytes, st.f_blocks * st.f_frsize // 20)
        if free < reserve:
            raise OSError(errno.ENOSPC, f"{free} bytes free, less than the {reserve} bytes kept for checkpoints")

    def _take(self) -> None:
        self._bytes -= len(self._backlog.popleft()[1])

    def _fail(self, path: str, e: OSError, now: float) -> list[tuple[str, str, dict[str, Any]]]:
        self._failing, self._retry_at = True, now + self.retry_s
        if self._warned:
            return []
        self._warned = True
        return [("warning", f"{self.name}: a write failed; lines are kept in memory and retried, training goes on",
                 {"file": path, "error": f"{type(e).__name__}: {e}", "retry_s": self.retry_s})]

    def _tell(self, notes: list[tuple[str, str, dict[str, Any]]]) -> None:
        for level, event, fields in notes:
            with contextlib.suppress(Exception):  # a report must not fail training either
                self.report(level, event, fields)


def log_report(log: Any = None) -> Report:
    """An Appender's reports as structlog events (of `log`, else the logger configured at the time)."""
    return lambda level, event, fields: getattr(log or structlog.get_logger(), level)(event, **fields)
