"""MLflow tracking against a real tracking server on localhost (SQLite, a free port), read back through
`MlflowClient`: one MLflow run per prefix run across preemptions and kills, every step once, and a server
that goes down mid-run never changes or stops training."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import (
    REPO,
    Launch,
    assert_same_weights,
    checkpoint,
    losses,
    read_jsonl,
    train_cmd,
    uninterrupted,
)

pytest.importorskip("mlflow.server", reason="the mlflow extra's server (in the dev extra)")
from mlflow.entities import ViewType  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from prefix.telemetry.mlflow_run import MlflowTracker, _flat  # noqa: E402
from prefix.telemetry.trackers import Record, RunInfo  # noqa: E402

STEPS = 100
SETTINGS = (f"trainer.max_steps={STEPS}", "checkpoint.every_steps=10", "trainer.eval_every=20",
            "telemetry.tensorboard=false")


class Server:
    """`mlflow server` in a session of its own, stopped with SIGKILL (as a crashed host would) and started
    again on the same port and database."""

    def __init__(self, folder: Path):
        self.folder = folder
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.folder}/mlflow.db",
               "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1"]
        with open(self.folder / "server.log", "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=self.folder,
                                         start_new_session=True,
                                         env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.folder / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.25)
        self.stop()
        raise AssertionError(f"mlflow server not up in 180 s:\n{(self.folder / 'server.log').read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the server and its uvicorn worker
            self.proc.wait(30)
        self.proc = None


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    s = Server(tmp_path_factory.mktemp("mlflow"))
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> MlflowClient:
    return MlflowClient(tracking_uri=server.uri)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    """The same run without any tracker, never interrupted."""
    return uninterrupted(tmp_path_factory.mktemp("baseline"), "base", *SETTINGS)


def tracking(server: Server, experiment: str) -> tuple[str, ...]:
    return (*SETTINGS, f"telemetry.mlflow.tracking_uri={server.uri}", f"telemetry.mlflow.experiment={experiment}")


def the_run(client: MlflowClient, experiment: str) -> Any:
    """The one MLflow run of the experiment (fails if there are more)."""
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment}"
    runs = client.search_runs([found.experiment_id], run_view_type=ViewType.ALL)
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def server_step(client: MlflowClient, experiment: str) -> int:
    """The latest train step the server holds (0 before the run exists)."""
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    return int(max((m.step for m in runs[0].data._metric_objs if m.key == "train/loss"), default=0)) if runs else 0


def wait_for_server_step(client: MlflowClient, experiment: str, step: int, launch: Launch) -> None:
    deadline = time.monotonic() + 120
    while server_step(client, experiment) < step:
        assert time.monotonic() < deadline and launch.proc.poll() is None, launch.log.read_text()[-3000:]
        time.sleep(0.1)


def tracker_warnings(run_dir: Path) -> list[str]:
    return [e["event"] for e in read_jsonl(run_dir / "logs" / "rank0.jsonl")
            if e.get("tracker") == "mlflow" and e.get("level") == "warning"]


def assert_every_step_once(client: MlflowClient, run_id: str, run_dir: Path, last: int) -> None:
    """train/loss holds each step 1..last once, with the value of metrics/train.jsonl's last line for it."""
    logged = history(client, run_id, "train/loss")
    assert [s for s, _ in logged] == list(range(1, last + 1))
    assert dict(logged) == losses(run_dir)


# One run preempted twice and SIGKILLed once, shared by the tests below.

@pytest.fixture(scope="module")
def preempted(server: Server, client: MlflowClient, tmp_path_factory) -> dict[str, Any]:
    """SIGKILL once the server holds steps the resume redoes, SIGTERM, SIGTERM, then to the end."""
    root = tmp_path_factory.mktemp("preempted")
    run_dir, settings = root / "p", (*tracking(server, "preempted"), "trainer.sample_every=20",
                                     "trainer.sample_tokens=8")
    first = Launch(train_cmd(2, "p", root, *settings), root / "log1")
    wait_for_server_step(client, "preempted", 1, first)  # the relay is live (it imports and opens first)
    target = (max(losses(run_dir)) // 10 + 1) * 10 + 3  # 3 steps past a periodic checkpoint, 7 before the next
    first.wait_for_step(run_dir, target)
    wait_for_server_step(client, "preempted", target, first)
    first.kill_all()
    held = server_step(client, "preempted")
    for log in ("log2", "log3"):
        again = Launch(train_cmd(2, "p", root, *settings), root / log)
        again.wait_for_step(run_dir, max(losses(run_dir)) + 3)
        again.sigterm()
        again.wait()  # torchrun's own code is 1 after a signal; the workers' ends are in meta/starts.jsonl
    last = Launch(train_cmd(2, "p", root, *settings), root / "log4")
    assert last.wait() == 0
    return {"run_dir": run_dir, "held_at_kill": held}


def test_one_mlflow_run_for_a_run_preempted_twice(preempted: dict[str, Any], client: MlflowClient,
                                                  baseline: Path) -> None:
    run_dir = preempted["run_dir"]
    found = the_run(client, "preempted")
    starts = read_jsonl(run_dir / "meta" / "starts.jsonl")
    assert len(starts) == 4 and [s["previous_end"] for s in starts[1:]] == [
        "killed without a final checkpoint", "preempted with a final checkpoint", "preempted with a final checkpoint"]
    assert found.info.status == "FINISHED" and found.info.end_time is not None
    assert found.info.run_name == "p" and found.data.tags["prefix.status"] == "completed"
    config = yaml.safe_load((run_dir / "meta" / "config.yaml").read_text())
    assert found.data.params == _flat(config)
    assert found.data.params["trainer.max_steps"] == str(STEPS) and found.data.params["model.d_model"] == "64"
    assert found.data.params["telemetry.mlflow.experiment"] == "preempted"
    assert not [k for k in found.data.tags if k.startswith("config_change.")]
    report = {Path(f.path).name for f in client.list_artifacts(found.info.run_id, "report")}
    assert {"summary.md", "loss.png", "report.json"} <= report
    assert found.data.metrics["summary/train/loss"] == losses(run_dir)[STEPS]
    # restarts are events: one point per start, at the step it resumed from
    assert history(client, found.info.run_id, "restart/count") == [(s["start_step"], s["restart"]) for s in starts]
    restarts = {Path(f.path).name for f in client.list_artifacts(found.info.run_id, "restarts")}
    assert restarts == {f"start-{i:03d}.json" for i in range(4)}
    samples = {Path(f.path).name for f in client.list_artifacts(found.info.run_id, "samples")}
    assert samples == {f"step-{s:06d}.txt" for s in range(20, STEPS + 1, 20)}
    assert_same_weights(checkpoint(run_dir).model, checkpoint(baseline).model)


def test_steps_redone_after_a_sigkill_are_logged_once(preempted: dict[str, Any], client: MlflowClient) -> None:
    run_dir = preempted["run_dir"]
    starts = read_jsonl(run_dir / "meta" / "starts.jsonl")
    assert starts[1]["start_step"] < preempted["held_at_kill"], "the server must hold steps the resume redoes"
    found = the_run(client, "preempted")
    assert_every_step_once(client, found.info.run_id, run_dir, STEPS)
    evals = history(client, found.info.run_id, "eval/val_loss")
    assert [s for s, _ in evals] == list(range(20, STEPS + 1, 20))
    assert dict(evals) == {r["step"]: r["val_loss"] for r in read_jsonl(run_dir / "metrics" / "eval.jsonl")}


def test_a_server_down_mid_run_changes_nothing_and_is_caught_up(server: Server, client: MlflowClient, baseline: Path,
                                                                 tmp_path: Path) -> None:
    """The server dies at step ~10 and the run trains to the end without it: the same weights, one warning,
    an end within the close deadline. Restarted, the server gets every missed step from the next start."""
    run_dir, settings = tmp_path / "d", tracking(server, "down")
    first = Launch(train_cmd(2, "d", tmp_path, *settings), tmp_path / "log1")
    try:
        first.wait_for_step(run_dir, 8)
        wait_for_server_step(client, "down", 8, first)
        server.stop()
        down_at = max(losses(run_dir))
        assert first.wait() == 0
        assert STEPS - down_at >= 20, "the outage must cover many steps for 'one warning' to mean anything"
        assert_same_weights(checkpoint(run_dir).model, checkpoint(baseline).model)
        warned = tracker_warnings(run_dir)
        assert sum("failed" in w for w in warned) == 1, warned
        assert len(warned) <= 2, warned  # the outage, and at most that this start ended with records queued
    finally:
        server.start()
    assert server_step(client, "down") < STEPS  # the end of the run never reached the server

    more = Launch(train_cmd(2, "d", tmp_path, *settings, f"trainer.max_steps={STEPS + 10}"), tmp_path / "log2")
    assert more.wait() == 0
    found = the_run(client, "down")
    assert_every_step_once(client, found.info.run_id, run_dir, STEPS + 10)
    assert found.info.status == "FINISHED" and not tracker_warnings(run_dir)[len(warned):]
    assert found.data.params["trainer.max_steps"] == str(STEPS)  # params are the first start's config
    assert found.data.tags["config_change.trainer.max_steps"] == str(STEPS + 10)


# The tracker in-process, against the same server: finding the run again, held steps, config changes, status.

def run_info(path: Path, config: dict[str, Any], start_step: int = 0, restarts: int = 0) -> RunInfo:
    (path / "meta").mkdir(parents=True, exist_ok=True)
    return RunInfo(path.name, path, "inproc", 1.5, config, start_step, restarts)


def test_the_run_is_found_again_without_the_cursor(server: Server, client: MlflowClient, tmp_path: Path) -> None:
    """A start killed between creating the MLflow run and writing meta/trackers.json: the next start finds
    the run by its uid tag; what the server holds per split is its latest step."""
    from prefix.config import MlflowConfig

    config = {"trainer": {"lr": 0.1, "sample_prompt": "def ", "sample_prompts": ["a", "b"]}, "data": {"streams": []}}
    first = MlflowTracker(MlflowConfig(tracking_uri=server.uri))
    assert first.open(run_info(tmp_path, config), {})["train"] == -1  # a new run holds nothing
    values = {"lr": 0.1, "grad_norm": 1.0, "tokens_seen": 8, "note": "text", "ok": True}
    first.log([Record("train", s, {"loss": 1.0 / s, **values}, 1000.0 + s) for s in range(1, 301)]  # 2 calls
              + [Record("eval", 4, {"val_loss": 0.5}, 1004.0), Record("samples", 4, {"prompt": "a", "text": "b"}, 0)])
    first.log([Record("train", 300, {"loss": 1.0 / 300, **values}, 1300.0)])  # a retried call: kept once
    second = MlflowTracker(MlflowConfig(tracking_uri=server.uri))
    held = second.open(run_info(tmp_path, config, start_step=3, restarts=1), {})
    assert second.run_id == first.run_id
    assert (held["train"], held["eval"], held["samples"], held["checkpoint"]) == (300, 4, 4, -1)
    assert history(client, first.run_id, "train/loss") == [(s, 1.0 / s) for s in range(1, 301)]
    assert len(history(client, first.run_id, "train/tokens_seen")) == 300
    assert "train/note" not in client.get_run(first.run_id).data.metrics  # text and bools are no metrics
    assert client.download_artifacts(first.run_id, "samples/step-000004.txt", str(tmp_path)).endswith(".txt")
    third = MlflowTracker(MlflowConfig(tracking_uri=server.uri))
    third.open(run_info(tmp_path, {**config, "trainer": {**config["trainer"], "lr": 0.2}}, 3, 2), second.state())
    found = client.get_run(first.run_id)
    assert third.run_id == first.run_id and found.data.params == _flat(config)
    assert found.data.params["trainer.sample_prompts"] == '["a", "b"]' and found.data.params["data.streams"] == "[]"
    assert {k: v for k, v in found.data.tags.items() if k.startswith("config_change.")} == \
        {"config_change.trainer.lr": "0.2"}
    MlflowTracker(MlflowConfig(tracking_uri=server.uri)).open(run_info(tmp_path, config, 3, 3), third.state())
    assert not [k for k in client.get_run(first.run_id).data.tags if k.startswith("config_change.")]  # changed back


def test_the_mlflow_status_follows_how_each_start_ends(server: Server, client: MlflowClient, tmp_path: Path) -> None:
    from prefix.config import MlflowConfig

    def end(status: str) -> str:
        (tmp_path / "meta" / "run.json").write_text(json.dumps({"status": status}))
        tracker.close()
        return client.get_run(tracker.run_id).info.status

    tracker = MlflowTracker(MlflowConfig(tracking_uri=server.uri, experiment="statuses"))
    tracker.open(run_info(tmp_path, {}), {})
    assert client.get_run(tracker.run_id).info.status == "RUNNING"
    assert end("preempted") == "KILLED"
    tracker.open(run_info(tmp_path, {}, restarts=1), tracker.state())
    assert client.get_run(tracker.run_id).info.status == "RUNNING"
    assert end("crashed") == "FAILED"
    tracker.open(run_info(tmp_path, {}, restarts=2), tracker.state())
    (tmp_path / "summary.md").write_text("# done\n")
    tracker.finish({"train/loss": 1.25}, [tmp_path / "summary.md"])
    assert end("completed") == "FINISHED"
    found = client.get_run(tracker.run_id)
    assert found.data.tags["prefix.status"] == "completed" and found.data.metrics["summary/train/loss"] == 1.25
    assert [Path(f.path).name for f in client.list_artifacts(tracker.run_id, "report")] == ["summary.md"]


def test_the_package_imports_mlflow_only_when_configured() -> None:
    code = ("import sys, prefix.train, prefix.telemetry; from prefix.config import TelemetryConfig; "
            "prefix.telemetry.trackers_for(TelemetryConfig(tensorboard=False), None); "
            "print('mlflow' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr[-2000:]
