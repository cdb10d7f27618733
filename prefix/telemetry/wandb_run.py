"""Weights & Biases: one W&B run per prefix run, continued by every start (docs/tracking.md).

The W&B run id is the prefix run's `uid`, opened with resume="allow", so every restart, preemption
and resubmission continues the same W&B run. Charts use one x-axis, `trainer/step` (splits
interleave and a start catches up older lines, so W&B's own `_step` is only a row counter).

Redone steps appear once: `open` tells the relay the highest step W&B already holds per split, read
from the run's own record of it. Online, that is the resumed run's summary (each row carries a
hidden `<split>/step`). Offline, it is the `.wandb` transaction logs of the earlier starts: W&B
writes them in 32 KiB blocks, so a SIGKILL loses the last block's rows, and those rows are sent
again from `metrics/*.jsonl`, where a cursor would have skipped them. A start's restart event lost
that way is sent again from `meta/starts.jsonl`.

Built only when `telemetry.wandb.project` is set; wandb is imported here, in the relay's thread.
W&B's system monitor and console capture are off: prefix samples its own system metrics, and a
torchrun worker's console is already in its logs.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from prefix.runs.layout import read_jsonl
from prefix.telemetry.trackers import RESTART, SPLITS, Record, RunInfo, Tracker, numeric
from prefix.telemetry.wandb_logs import held_in_logs

if TYPE_CHECKING:
    from prefix.config import WandbConfig

STEP = "trainer/step"
"""The x-axis of every chart: the optimizer step a value belongs to."""
RESTART_COUNT = "restart/count"
INIT_S = 30.0
"""How long `wandb.init` may take before the relay retries it. Training never waits for it, but
wandb's exit hook waits for a connection attempt in flight, so it bounds how long a start's exit can
be held up by an unreachable server."""
FINISH_S = 10.0
"""How long finishing a start may upload (also bounds wandb's own exit hook); the rest is in the
transaction log, for `wandb sync`."""
STOPPED = 143
"""The exit code a start that did not complete the run reports to W&B, marked preempting: the W&B
run shows preempted, not failed, and the next start resumes it."""
EVENT = ("restart", "time", "start_step", "world_size", "host", "previous_end", "steps_redone", "config_changes")


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, cfg: WandbConfig):
        self.cfg = cfg
        self._run: Any = None
        self._id = ""
        self._held: dict[str, int] = {}
        """Per split, the highest step W&B holds (RESTART: the highest restart number)."""
        self._prompts: set[str] | None = None
        """The prompts W&B holds at the held step of `samples`; None: all (a step held before this start)."""
        self._logs: dict[str, Any] = {}
        """What each earlier start's transaction log holds (offline), so that each is read once."""
        self._completed = False

    def open(self, run: RunInfo, saved: dict[str, Any]) -> dict[str, int]:
        import wandb

        self._end()  # an open being retried lets go of the run its failed attempt may have made
        self._id, self._completed = saved.get("id") or run.uid, False
        root = Path(os.environ.get("WANDB_DIR") or run.path)
        held: dict[str, int] = {}
        if self.cfg.mode == "offline":
            held, self._logs = held_in_logs(root / "wandb", self._id, MARKS, saved.get("logs") or {})
        settings = wandb.Settings(mode=self.cfg.mode, init_timeout=INIT_S, finish_timeout=FINISH_S,
                                  x_disable_stats=True, console="off", quiet=True, reinit="create_new")
        self._run = wandb.init(project=self.cfg.project, entity=self.cfg.entity, id=self._id, resume="allow",
                               name=run.name, group=self.cfg.group or run.experiment, job_type="train",
                               config=run.config, dir=str(root), settings=settings)
        if self.cfg.mode == "disabled":
            return {}
        self._run.config.update(run.config, allow_val_change=True)  # a resumed run's config is this start's
        self._run.define_metric(STEP)
        self._run.define_metric("*", step_metric=STEP)
        for split in SPLITS:
            self._run.define_metric(f"{split}/step", hidden=True)
        if self.cfg.mode == "online":
            held = held_from(dict(self._run.summary)) if self._run.resumed else {}
            structlog.get_logger().info("W&B run", url=self._run.url, resumed=self._run.resumed)
        self._held, self._prompts = held, None
        for entry in read_jsonl(run.path / "meta" / "starts.jsonl"):  # earlier starts' events lost to a kill
            if isinstance(entry.get("restart"), int) and entry["restart"] < run.restarts:
                self._restart(int(entry.get("start_step") or 0), entry)
        splits = (set(SPLITS) | set(saved.get("held", {}))) - {RESTART}
        return {split: held.get(split, -1) for split in splits}

    def state(self) -> dict[str, Any]:
        return {"id": self._id, "logs": self._logs}

    def log(self, records: list[Record]) -> None:
        """One row per record; a record W&B holds already (a batch being retried) is skipped."""
        if self._open_run() is None:
            return
        samples: dict[int, list[Record]] = defaultdict(list)
        for r in records:
            held = self._held.get(r.split, -1)
            if r.split == RESTART:
                self._restart(r.step, r.values)
            elif r.split == "samples":  # a step's prompts may come in more than one batch
                if r.step > held or (r.step == held and self._prompts is not None and _prompt(r) not in self._prompts):
                    samples[r.step].append(r)
            elif r.step > held:
                self._log(r.split, r.step, {f"{r.split}/{k}": v for k, v in numeric(r.values).items()})
        for step in sorted(samples):  # a table per sample step (and batch), a row per prompt
            rows = [[step, _prompt(r), str(r.values.get("text", ""))] for r in samples[step]]
            if step > self._held.get("samples", -1) or self._prompts is None:
                self._prompts = set()
            self._log("samples", step, {"samples/text": self._table(["step", "prompt", "text"], rows)})
            self._prompts |= {row[1] for row in rows}

    def finish(self, summary: dict[str, float], artifacts: list[Path]) -> None:
        """Final metrics into the run's summary; the report's figures as images, its other files saved."""
        import wandb

        if self._open_run() is None:
            return
        self._run.summary.update(summary)
        images = {f"report/{p.stem}": wandb.Image(str(p)) for p in artifacts if p.suffix.lower() in (".png", ".jpg")}
        if images:
            self._run.log({STEP: self._held.get("train", 0), **images})
        for path in artifacts:
            if path.suffix.lower() not in (".png", ".jpg") and path.is_file():  # a copy: the file as it was now
                shutil.copyfile(path, Path(self._run.dir) / path.name)
                self._run.save(str(Path(self._run.dir) / path.name), base_path=self._run.dir, policy="now")
        self._completed = True

    def close(self) -> None:
        self._end()

    def _end(self) -> None:
        """Finish this start's W&B run: completed (exit 0), or preempted (the next start resumes it)."""
        run, self._run = self._run, None
        if run is None:
            return
        if not self._completed:
            run.mark_preempting()
        run.finish(exit_code=0 if self._completed else STOPPED)

    def _open_run(self) -> Any:
        """The W&B run (None when disabled); raises when it is not open, so that the relay tries again."""
        if self.cfg.mode == "disabled":
            return None
        if self._run is None:
            raise RuntimeError("the W&B run is not open")
        return self._run

    def _log(self, split: str, step: int, values: dict[str, Any]) -> None:
        self._run.log({STEP: step, f"{split}/step": step, **values})
        self._held[split] = max(step, self._held.get(split, -1))

    def _restart(self, step: int, values: Mapping[str, Any]) -> None:
        """A start as an event: `restart/*` metrics at the step it resumed from, and its line as a table."""
        count = values.get("restart")
        if not isinstance(count, int) or count <= self._held.get(RESTART, -1):
            return
        event = [[json.dumps(v) if isinstance(v, dict) else v if v is None or isinstance(v, (int, float))
                  else str(v) for v in (values.get(k) for k in EVENT)]]
        self._run.log({STEP: step, RESTART_COUNT: count,
                       **{f"restart/{k}": v for k, v in numeric(values).items() if k in ("steps_redone", "world_size")},
                       "restart/event": self._table(list(EVENT), event)})
        self._held[RESTART] = count

    @staticmethod
    def _table(columns: list[str], rows: list[list[Any]]) -> Any:
        import wandb

        return wandb.Table(columns=columns, data=rows, allow_mixed_types=True)


MARKS = {**{f"{split}/step": split for split in SPLITS}, RESTART_COUNT: RESTART}
"""The keys that say how far W&B holds each split (and the restart events)."""


def held_from(row: Mapping[str, Any]) -> dict[str, int]:
    """The steps a run's summary says W&B holds, per split (RESTART: the last restart number)."""
    return {split: int(row[key]) for key, split in MARKS.items()
            if isinstance(row.get(key), (int, float)) and not isinstance(row.get(key), bool)}


def _prompt(r: Record) -> str:
    return str(r.values.get("prompt", ""))
