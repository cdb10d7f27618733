"""RunManager: one run's status, metadata and metrics, on disk and in the registry.

`meta/run.json` is the run's truth (experiment, status, created, updated, step, target, restarts,
last exit code); every change is written there atomically and then queued for the registry, so a
slow or broken registry never slows the run. Only the main rank writes; the others get a manager
that knows the paths and writes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from prefix.errors import UserError
from prefix.runs import environment
from prefix.runs.layout import (
    EXIT_STATUS,
    PREVIOUS_END,
    UNKNOWN_END,
    RunDir,
    check_run_name,
    write_atomically,
)
from prefix.runs.registry import Registry, Writer
from prefix.telemetry import Metrics, RunInfo, Tracker
from prefix.watchdog import read_heartbeat


def last_step_seen(run_dir: RunDir, state: dict[str, Any]) -> int:
    """The furthest step the previous start reached: its heartbeat (every step) or its run.json."""
    beat = read_heartbeat(run_dir) or {}
    return max(int(state.get("step") or 0), int(beat.get("step") or 0))


class RunManager:
    def __init__(self, run_dir: RunDir, experiment: str, registry: Registry | None, log: Any,
                 main: bool = True, trackers: Sequence[Tracker] = (), relabel: bool = True):
        """`experiment` labels a new run; a run that exists keeps its first label unless `relabel`."""
        self.dir, self.experiment, self.registry, self.log, self.main = run_dir, experiment, registry, log, main
        self.relabel = relabel
        self.state: dict[str, Any] = {}
        self.metrics = Metrics(run_dir.metrics, enabled=main, trackers=trackers)
        self._writer: Writer | None = None
        self.guard: Callable[[], None] = lambda: None
        """Called before every write into the run (the lease's fence: exits if another start took over)."""
        self.lease_wait_s = 0.0
        """Seconds this start waited for the run's lease (counted in the goodput ledger)."""
        self.lease_epoch = 0
        """The run lease's epoch of this start (one more than the start before), on every rank."""

    @classmethod
    def open(cls, registry: Registry, experiment: str, run_name: str, resume: bool = True,
             log: Any = None) -> RunManager:
        """Open (resume=True) or create the run `<registry root>/<run_name>` and make its folders.

        `begin()` then records the start; `prefix.train` does the same in steps, so that nothing is
        written before every check of the start passed.
        """
        import structlog

        run_dir = RunDir(registry.root / check_run_name(run_name))
        run_dir.check()
        if not resume and (run_dir.meta / "run.json").exists():
            raise UserError(f"{run_dir.path}: the run exists; pass resume=True or choose another run name")
        run = cls(run_dir, experiment, registry, log or structlog.get_logger())
        run.create()
        return run

    @property
    def name(self) -> str:
        return self.dir.path.name

    def create(self) -> None:
        """Make the run's folders (main rank only; raises UserError when it cannot)."""
        if self.main:
            self.dir.create()

    def begin(self, start_step: int, target_step: int, world_size: int, config: dict[str, Any],
              config_changes: dict[str, list[Any]] | None = None) -> int:
        """Record this start (how the previous one ended, steps redone) and mark the run running.

        Returns the number of restarts before this start.
        """
        self.guard()
        previous = self.dir.state()
        starts = self.dir.starts()
        entry = {"time": time.time(), "start_step": start_step, "world_size": world_size,
                 "restart": len(starts), "host": socket.gethostname(), "config_changes": config_changes or {}}
        if starts:
            entry["previous_end"] = PREVIOUS_END.get(previous.get("status"), UNKNOWN_END)
            entry["steps_redone"] = max(0, last_step_seen(self.dir, previous) - start_step)
        try:
            with open(self.dir.meta / "starts.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
        except OSError as e:  # a full volume costs the start's record, not the run (checkpoints decide)
            self.log.warning("meta/starts.jsonl not written; training goes on", error=str(e))
        self.log_metadata(config, "config", format="yaml")
        self.log_metadata(environment.snapshot(world_size), "environment")
        self.log_metadata(environment.code_version(), "code")
        now = time.time()
        if not self.relabel:  # a resubmission from another config path is still the same experiment
            self.experiment = previous.get("experiment") or self.experiment
        self.state = {"experiment": self.experiment, "run": self.name, "status": "running",
                      "created": previous.get("created", now), "updated": now, "step": start_step,
                      "target_step": target_step, "restarts": len(starts), "exit_code": None}
        self._writer = Writer(self.registry, self.log) if self.registry is not None else None
        self._save()
        self.metrics.start(RunInfo(self.name, self.dir.path, self.experiment, self.state["created"], config,
                                   start_step, len(starts), entry))
        return len(starts)

    def log_metadata(self, obj: Any, name: str, format: str = "json") -> Path | None:
        """Write a dataclass or mapping to meta/<name>.json|yaml, atomically (main rank only)."""
        if not self.main:
            return None
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            obj = dataclasses.asdict(obj)
        if format not in ("json", "yaml"):
            raise UserError(f"log_metadata: format {format!r} is not json or yaml; pick one of those")
        text = yaml.safe_dump(obj, sort_keys=False) if format == "yaml" else json.dumps(obj, indent=2, default=str)
        self.guard()
        path = self.dir.meta / f"{name}.{format}"
        try:
            write_atomically(path, text)
        except OSError as e:
            self.log.warning(f"meta/{name}.{format} not written; training goes on", error=str(e))
            return None
        return path

    def log_metrics(self, split: str, step: int, values: dict[str, Any]) -> None:
        """Append to metrics/<split>.jsonl (and TensorBoard); a train line also moves the run's step."""
        self.guard()
        self.metrics.write(split, step, **values)
        if self.main and split == "train" and self.state:
            self.update(step=step)

    def update(self, **fields: Any) -> None:
        if self.main and self.state:
            self.state.update(fields, updated=time.time())
            self._save()

    def finish(self, exit_code: int, step: int | None = None, report: Callable[[], list[Path]] | None = None) -> None:
        """The run's status from how this start ends; flushes the registry and trackers (bounded waits).

        When the run completed, the trackers get its final metrics and `report()`'s files."""
        completed = False
        if self.main and self.state:
            fields = {"status": EXIT_STATUS.get(exit_code, "crashed"), "exit_code": exit_code}
            self.update(**fields, **({"step": step} if step is not None else {}))
            completed = exit_code == 0 and step is not None and step >= self.state.get("target_step", step + 1)
        self.close(completed, report)

    def close(self, completed: bool = False, report: Callable[[], list[Path]] | None = None) -> None:
        files = completed and any(t.keeps_files for t in self.metrics.trackers)
        if files:
            self.guard()  # the report is written into the run
        artifacts = _report_files(report, self.log) if files else []
        self.metrics.close(self.metrics.summary() if completed else None, artifacts)
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _save(self) -> None:
        self.guard()
        try:
            write_atomically(self.dir.meta / "run.json", json.dumps(self.state, indent=2))
        except OSError as e:  # a full disk shows up in the checkpoint path, which decides what happens
            self.log.warning("meta/run.json not written", error=str(e))
        if self._writer is not None:
            self._writer.put({**self.state, "path": str(self.dir.path)})


def _report_files(report: Callable[[], list[Path]] | None, log: Any) -> list[Path]:
    """The report's figures and summary for the trackers; a report that fails costs only them."""
    if report is None:
        return []
    try:
        return report()
    except Exception as e:
        log.warning("report for the trackers not written", error=f"{type(e).__name__}: {e}")
        return []
