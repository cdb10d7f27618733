"""An index of every run under a runs root: one SQLite database, rebuilt from the run directories.

Each run's `meta/run.json` is the truth; the database only makes `prefix runs` fast over hundreds
of runs. So the registry is allowed to be wrong for a moment and never allowed to hurt training:
writes happen on a background thread, a locked or unreachable database is logged once and skipped
(the next update carries the whole record again), and `reindex()` rebuilds it from the run folders.
"""

from __future__ import annotations

import json
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

DB_NAME = "registry.sqlite"
FIELDS = ("run", "experiment", "path", "status", "created", "updated", "step", "target_step", "restarts",
          "exit_code")
_SCHEMA = """CREATE TABLE IF NOT EXISTS runs (
    run TEXT PRIMARY KEY, experiment TEXT, path TEXT, status TEXT, created REAL, updated REAL,
    step INTEGER, target_step INTEGER, restarts INTEGER, exit_code INTEGER)"""


def _connect(path: Path, timeout_s: float) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=timeout_s, isolation_level=None)
    # WAL: readers never block the writers of other runs. The mode is stored in the file, so only the
    # first connection changes it; that change needs the database to itself and answers "locked" at once,
    # without SQLite's busy wait, when another run is connecting too (seen when two runs create it): retry.
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                db.close()
                raise
            time.sleep(0.01)
    db.execute(_SCHEMA)
    return db


def _upsert(db: sqlite3.Connection, record: dict[str, Any]) -> None:
    values = [record.get(f) for f in FIELDS]
    db.execute(f"INSERT OR REPLACE INTO runs ({', '.join(FIELDS)}) VALUES ({', '.join('?' * len(FIELDS))})",
               values)


class Registry:
    """`<runs_root>/registry.sqlite`: read it with `runs()`, write it with `update()`."""

    def __init__(self, runs_root: Path, timeout_s: float = 5.0):
        self.root = Path(runs_root)
        self.path = self.root / DB_NAME
        self.timeout_s = timeout_s

    def runs(self, experiment: str | None = None, status: str | None = None) -> list[dict[str, Any]]:
        """Every indexed run, newest first, optionally of one experiment and/or status."""
        if not self.path.is_file():
            return []
        where, args = [], []
        for column, value in (("experiment", experiment), ("status", status)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        sql = f"SELECT {', '.join(FIELDS)} FROM runs {'WHERE ' + ' AND '.join(where) if where else ''} " \
              "ORDER BY created DESC"
        with _connect(self.path, self.timeout_s) as db:
            return [dict(zip(FIELDS, row, strict=True)) for row in db.execute(sql, args)]

    def update(self, record: dict[str, Any]) -> None:
        """Write one run's whole record now (raises sqlite3.Error / OSError; see `Writer`)."""
        self.root.mkdir(parents=True, exist_ok=True)
        db = _connect(self.path, self.timeout_s)
        try:
            _upsert(db, record)
        finally:
            db.close()

    def reindex(self) -> int:
        """Rebuild the index from `<root>/*/meta/run.json`; returns the number of runs found."""
        records = []
        for meta in sorted(self.root.glob("*/meta/run.json")):
            try:
                records.append({**json.loads(meta.read_text()), "path": str(meta.parent.parent)})
            except (OSError, ValueError):
                continue  # a torn or unreadable file: the run shows up again at its next update
        self.root.mkdir(parents=True, exist_ok=True)
        db = _connect(self.path, self.timeout_s)
        try:
            db.execute("BEGIN IMMEDIATE")
            db.execute("DELETE FROM runs")
            for record in records:
                _upsert(db, record)
            db.execute("COMMIT")
        finally:
            db.close()
        return len(records)


class Writer:
    """Applies registry updates on a daemon thread, newest record wins, failures logged once."""

    def __init__(self, registry: Registry, log: Any):
        self.registry, self.log = registry, log
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._warned = False
        self._thread = threading.Thread(target=self._run, name="prefix-registry", daemon=True)
        self._thread.start()

    def put(self, record: dict[str, Any]) -> None:
        self._queue.put(dict(record))

    def _run(self) -> None:
        while (record := self._queue.get()) is not None:
            while not self._queue.empty():  # only the newest state matters
                newer = self._queue.get()
                if newer is None:
                    self._apply(record)
                    return
                record = newer
            self._apply(record)

    def _apply(self, record: dict[str, Any]) -> None:
        try:
            self.registry.update(record)
        except (sqlite3.Error, OSError) as e:
            if not self._warned:
                self._warned = True
                self.log.warning("run registry not updated; training goes on (prefix runs --reindex repairs it)",
                                 path=str(self.registry.path), error=f"{type(e).__name__}: {e}")

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush what is queued, waiting at most `timeout_s`: the exit path must not hang on a lock."""
        self._queue.put(None)
        self._thread.join(timeout_s)
