"""The run directory contract: `<runs_root>/<run_name>/` with checkpoints, logs, meta, metrics, tb.

The run name is the run's identity: starting the same name again resumes it. `meta/` records the
resolved config, the code and environment, `run.json` (status, step, restarts: the truth the
registry indexes) and one line per start, so a run's restart history is on disk next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefix.errors import UserError

STATUSES = ("running", "preempted", "crashed", "completed")
"""A run's status in meta/run.json and the registry."""
EXIT_STATUS = {0: "completed", 143: "preempted"}
"""Exit codes of prefix.train → status (143: stopped by a signal after its final checkpoint); others: crashed."""
PREVIOUS_END = {"completed": "finished", "preempted": "preempted with a final checkpoint",
                "crashed": "crashed", "running": "killed without a final checkpoint"}
"""How a start finds the one before it ended, by the status that start left in run.json."""
UNKNOWN_END = "unknown"

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def runs_root(cli_value: str | None) -> Path:
    """--runs-root, else $PREFIX_RUNS_ROOT, else ./runs."""
    return Path(cli_value or os.environ.get("PREFIX_RUNS_ROOT") or "runs").expanduser()


def add_runs_root(parser: argparse.ArgumentParser) -> None:
    """The one definition of --runs-root, for every command that reads or writes runs."""
    parser.add_argument("--runs-root", help="folder of run directories (default: $PREFIX_RUNS_ROOT, else ./runs)")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON object line of a run's .jsonl file; a line torn by a kill is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` so that a reader (a probe, `prefix status`) never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full volume: no half-written file left beside the real one
        raise


def check_run_name(name: str) -> str:
    if not RUN_NAME.match(name) or ".." in name:
        raise UserError(f"--run-name: {name!r} is not a valid run name; use up to 63 letters, digits, "
                        "'-', '_' or '.', starting with a letter or digit")
    return name


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def meta(self) -> Path:
        return self.path / "meta"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics"

    @property
    def tb(self) -> Path:
        return self.path / "tb"

    def check(self) -> None:
        """Refuse paths that cannot be a run directory, before anything is written."""
        for path in (self.path.parent, self.path, self.checkpoints):
            if path.exists() and not path.is_dir():
                raise UserError(f"{path}: exists and is not a directory; remove it or choose another "
                                "--run-name / --runs-root")
            if path.is_dir() and not os.access(path, os.R_OK | os.W_OK | os.X_OK):
                raise UserError(f"{path}: not readable and writable by this user; fix its permissions "
                                "or choose another --runs-root")

    def create(self) -> None:
        try:
            for folder in (self.checkpoints, self.logs, self.meta, self.metrics):
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{self.path}: cannot create the run directory ({e.strerror}); "
                            "choose a writable --runs-root or PREFIX_RUNS_ROOT") from None

    def starts(self) -> list[dict[str, Any]]:
        return read_jsonl(self.meta / "starts.jsonl")

    def state(self) -> dict[str, Any]:
        """meta/run.json (status, step, target, restarts, exit code), or {} before the first start."""
        try:
            state = json.loads((self.meta / "run.json").read_text())
        except (OSError, ValueError):
            return {}
        return state if isinstance(state, dict) else {}
