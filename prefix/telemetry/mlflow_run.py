"""MLflow tracking: one MLflow run per prefix run, however many starts it takes (docs/tracking.md).

Every method runs on the MLflow relay's thread (see `trackers`), through an `MlflowClient` with
explicit run ids: no global `mlflow.start_run` state. The MLflow run is found again on every start:
by the id kept in meta/trackers.json, else by its `prefix.uid` tag (a start killed between creating
the run and writing that file), else created. What the run already holds is asked from the server
(the latest step of each metric), so steps a resume redoes are not logged twice and steps a
previous start could not deliver are caught up from metrics/.

Status in the MLflow UI: RUNNING while a start trains; KILLED when a start was preempted (the next
start sets RUNNING again); FAILED when it crashed; FINISHED with its end time when the run completed.
The tag `prefix.status` holds prefix's own word for it.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefix.runs.layout import RunDir
from prefix.telemetry.trackers import RESTART, SPLITS, Record, RunInfo, Tracker, numeric

if TYPE_CHECKING:
    from prefix.config import MlflowConfig

UID_TAG = "prefix.uid"
REQUESTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
"""MLflow's own retries (7, up to minutes per call) would hold the relay past the end of a start; the relay
retries instead. Jitter 0: urllib3 draws it from Python's global `random`, a stream checkpoints restore.
Defaults only: a variable the user set wins."""
METRICS_PER_BATCH, PARAMS_PER_BATCH, PARAM_CHARS, TAG_CHARS = 1000, 100, 6000, 8000
"""MLflow's limits per `log_batch` call and per value."""
END_STATUS = {"completed": "FINISHED", "preempted": "KILLED", "crashed": "FAILED"}
"""prefix's status of the run (meta/run.json) when a start ends → the MLflow run's status."""
BAD_KEY = re.compile(r"[^\w./\- ]")


class MlflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, cfg: MlflowConfig):
        self.cfg = cfg
        for key, value in REQUESTS.items():
            os.environ.setdefault(key, value)  # here, before the relay's thread exists
        self.client: Any = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._run: RunInfo | None = None
        self._last_step = 0
        self._finished_ms: int | None = None
        self._ended = False

    def open(self, run: RunInfo, saved: dict[str, Any]) -> dict[str, int]:
        from mlflow.tracking import MlflowClient  # the relay's thread: a second of imports off the step loop

        self._run, self._finished_ms, self._ended = run, None, False
        self.client = MlflowClient(tracking_uri=self.cfg.tracking_uri)
        self.experiment_id = self._experiment(self.cfg.experiment or run.experiment)
        found = self._find(run, saved.get("run_id"))
        if found is None:
            found = self.client.create_run(self.experiment_id, run_name=run.name,
                                           tags={UID_TAG: run.uid, "prefix.run_dir": str(run.path)})
        self.run_id = found.info.run_id
        self._log_config(run, found.data.params, found.data.tags)
        self._batch(tags={"prefix.status": "running", "prefix.restarts": str(run.restarts)})
        if found.info.status != "RUNNING":
            self.client.update_run(self.run_id, status="RUNNING")
        return self._held(found)

    def state(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "experiment_id": self.experiment_id}

    def log(self, records: list[Record]) -> None:
        """Metrics in record order (so what the server holds per split is a prefix of what was sent), then
        samples and restarts. A retried call sends the same metrics again: the server keeps one of each."""
        from mlflow.entities import Metric

        batch: list[Metric] = []
        samples: dict[int, list[dict[str, Any]]] = {}
        restarts: list[Record] = []
        for r in records:
            if r.split == "samples":
                samples.setdefault(r.step, []).append(r.values)
                continue
            values = numeric(r.values)
            if r.split == RESTART:
                restarts.append(r)
                values = {"count": values.get("restart", 0.0),
                          **{k: values[k] for k in ("steps_redone", "world_size") if k in values}}
            metrics = [Metric(_key(f"{r.split}/{k}"), v, int(r.time * 1000), r.step) for k, v in values.items()]
            if batch and len(batch) + len(metrics) > METRICS_PER_BATCH:  # a record's values go in one call
                self.client.log_batch(self.run_id, metrics=batch)
                batch = []
            batch += metrics
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)
        for step, texts in samples.items():
            self.client.log_text(self.run_id, "\n\n".join(_sample(v) for v in texts), f"samples/step-{step:06d}.txt")
        for r in restarts:
            count = int(r.values.get("restart", 0))
            self.client.log_text(self.run_id, json.dumps({"step": r.step, **r.values}, indent=2, default=str),
                                 f"restarts/start-{count:03d}.json")
            self._batch(tags={"prefix.restarts": str(count)})
        self._last_step = max([self._last_step, *(r.step for r in records)])

    def finish(self, summary: dict[str, float], artifacts: list[Path]) -> None:
        """Final values as `summary/<key>` at the last step, the report's files under `report/`, FINISHED."""
        from mlflow.entities import Metric

        if self._finished_ms is None:  # a retried finish logs the same values, which the server keeps once
            self._finished_ms = int(time.time() * 1000)
        metrics = [Metric(_key(f"summary/{k}"), v, self._finished_ms, self._last_step)
                   for k, v in numeric(summary).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)
        for path in artifacts:
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), f"report/{path.name}")
            elif path.is_file():
                self.client.log_artifact(self.run_id, str(path), "report")
        self._end("completed")

    def close(self) -> None:
        """The start ends: the run's status says how (preempted, crashed); nothing when finish() did it."""
        if self.run_id is None or self._run is None or self._ended:
            return
        status = RunDir(self._run.path).state().get("status")
        if status in END_STATUS:
            self._end(status)

    # Helpers.

    def _end(self, status: str) -> None:
        self._batch(tags={"prefix.status": status})
        if status == "completed":
            self.client.set_terminated(self.run_id, "FINISHED")  # with its end time: the run is over
        else:
            self.client.update_run(self.run_id, status=END_STATUS[status])  # no end time: it may go on
        self._ended = True

    def _experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is None:
            try:
                return self.client.create_experiment(name)
            except MlflowException:  # another start created it meanwhile
                found = self.client.get_experiment_by_name(name)
                if found is None:
                    raise
        if found.lifecycle_stage != "active":
            raise RuntimeError(f"MLflow experiment {name!r} is deleted; restore it (`mlflow experiments restore`) "
                               "or set telemetry.mlflow.experiment")
        return found.experiment_id

    def _find(self, run: RunInfo, run_id: str | None) -> Any:
        """The saved run when it still exists in this experiment, else the one tagged with the run's uid."""
        from mlflow.entities import ViewType
        from mlflow.exceptions import MlflowException

        if run_id:
            try:
                found = self.client.get_run(run_id)
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
            else:
                if found.info.lifecycle_stage == "active" and found.info.experiment_id == self.experiment_id \
                        and found.data.tags.get(UID_TAG) == run.uid:
                    return found
        runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{UID_TAG}` = '{run.uid}'",
                                       run_view_type=ViewType.ACTIVE_ONLY, max_results=1,
                                       order_by=["attributes.start_time ASC"])
        return runs[0] if runs else None

    def _log_config(self, run: RunInfo, params: dict[str, str], tags: dict[str, str]) -> None:
        """Params are the first start's resolved config (MLflow params never change); a key changed on a
        resume (--allow-config-change, trainer.max_steps) shows as the tag `config_change.<key>`."""
        flat = _flat(run.config)
        new = {k: v for k, v in flat.items() if k not in params}
        changed = {f"config_change.{k}": v[:TAG_CHARS] for k, v in flat.items() if k in params and params[k] != v}
        for k in [k for k in tags if k.startswith("config_change.") and k not in changed]:
            self.client.delete_tag(self.run_id, k)  # changed back
        items = list(new.items())
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self._batch(params=dict(items[i:i + PARAMS_PER_BATCH]))
        items = [(k, v) for k, v in changed.items() if tags.get(k) != v]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self._batch(tags=dict(items[i:i + PARAMS_PER_BATCH]))

    def _held(self, found: Any) -> dict[str, int]:
        """The latest step the run holds per split: from each metric's latest value (MLflow's own system
        metrics monitor resumes from the same, without reading whole histories), and the sample files."""
        latest = getattr(found.data, "_metric_objs", None)
        if latest is None:
            return {}  # an MLflow that does not say: the relay goes by meta/trackers.json
        held = dict.fromkeys(SPLITS, -1)  # the server is the truth: a split it lacks is caught up whole
        for m in latest:
            split = m.key.split("/", 1)[0]
            held[split] = max(held.get(split, -1), int(m.step))
        names = [Path(f.path).stem for f in self.client.list_artifacts(self.run_id, "samples")]
        held["samples"] = max((int(n[5:]) for n in names if n.startswith("step-") and n[5:].isdigit()), default=-1)
        self._last_step = max(0, *held.values())
        return held

    def _batch(self, params: dict[str, str] | None = None, tags: dict[str, str] | None = None) -> None:
        from mlflow.entities import Param, RunTag

        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in (params or {}).items()],
                              tags=[RunTag(k, v) for k, v in (tags or {}).items()])


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """`section.key` → the value as MLflow keeps params (text; lists and mappings as JSON)."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
            flat[_key(f"{prefix}{key}")] = text[:PARAM_CHARS]
    return flat


def _key(name: str) -> str:
    """A metric or param name MLflow accepts (letters, digits, `_ - . / space`)."""
    return BAD_KEY.sub("_", name)[:250]


def _sample(values: dict[str, Any]) -> str:
    return f"prompt: {values.get('prompt', '')}\n{values.get('text', '')}"
