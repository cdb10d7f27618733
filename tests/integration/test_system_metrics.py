"""System/network sampling and TensorBoard events: real psutil, real files, real event files."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
import torch
from helpers import read_jsonl, run, train_cmd

from prefix.config import TelemetryConfig
from prefix.system_metrics import SystemSampler
from prefix.telemetry import Metrics, RunInfo, trackers_for
from prefix.telemetry import tensorboard as tensorboard_tracker

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

SYSTEM_KEYS = {"step", "time", "cpu_percent", "rss_bytes", "children", "children_cpu_percent", "children_rss_bytes",
               "host_cpu_percent", "mem_used_bytes", "mem_available_bytes", "mem_percent", "disk_free_bytes",
               "load_1m", "load_5m", "load_15m"}
NETWORK_KEYS = {"step", "time", "sent_bytes_per_s", "recv_bytes_per_s"}


class Recorder:
    """Stands in for the structlog logger: keeps what was logged."""

    def __init__(self) -> None:
        self.warnings: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.warnings.append((event, fields))


def scalars_of(tb: Path) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(tb))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def tensorboard_metrics(root: Path, start_step: int = 0, tb: Path | None = None) -> Metrics:
    """Rank 0's Metrics with the TensorBoard tracker, started at `start_step` as a resumed start would be."""
    (root / "meta").mkdir(parents=True, exist_ok=True)
    metrics = Metrics(root / "metrics", enabled=True, trackers=trackers_for(TelemetryConfig(), tb or root / "tb"))
    metrics.start(RunInfo("r", root, "test", 0.0, {"trainer": {"lr": 0.1}}, start_step))
    return metrics


def test_sampler_writes_system_and_network_lines(tmp_path: Path) -> None:
    sent: list[tuple[str, int, dict[str, float]]] = []
    sampler = SystemSampler(tmp_path / "metrics", 0.2, 0, torch.device("cpu"), tmp_path, step_fn=lambda: 7,
                            log=Recorder(), scalars=lambda prefix, step, values: sent.append((prefix, step, values)))
    with sampler:
        time.sleep(1.2)
        began = time.monotonic()
    assert time.monotonic() - began < 0.5, "stop() must not wait out an interval"
    system = read_jsonl(tmp_path / "metrics" / "system.jsonl")
    network = read_jsonl(tmp_path / "metrics" / "network.jsonl")
    assert len(system) >= 4 and len(network) >= 4
    for line in system:
        assert set(line) == SYSTEM_KEYS  # no CUDA fields on a CPU device
        assert line["step"] == 7 and line["rss_bytes"] > 0 and line["disk_free_bytes"] > 0
        assert 0 < line["mem_available_bytes"] and 0 <= line["mem_percent"] <= 100 and line["cpu_percent"] >= 0
    for line in network:
        assert set(line) == NETWORK_KEYS and line["sent_bytes_per_s"] >= 0 and line["recv_bytes_per_s"] >= 0
    assert {p for p, _, _ in sent} == {"system", "network"} and {s for _, s, _ in sent} == {7}
    assert not sampler._thread


def test_interval_zero_starts_nothing(tmp_path: Path) -> None:
    with SystemSampler(tmp_path / "metrics", 0, 0, torch.device("cpu"), tmp_path) as sampler:
        time.sleep(0.3)
        assert sampler._thread is None
    assert not (tmp_path / "metrics").exists()


def test_a_failing_part_is_logged_once_and_the_rest_goes_on(tmp_path: Path) -> None:
    doomed = tmp_path / "disk"
    doomed.mkdir()
    log = Recorder()
    with SystemSampler(tmp_path / "metrics", 0.1, 1, torch.device("cpu"), doomed, log=log):
        time.sleep(0.45)
        shutil.rmtree(doomed)
        time.sleep(0.8)
    lines = read_jsonl(tmp_path / "metrics" / "system_rank1.jsonl")  # rank 1: files of its own
    assert (tmp_path / "metrics" / "network_rank1.jsonl").is_file()
    assert "disk_free_bytes" in lines[0] and "step" not in lines[0]  # no step_fn: time only
    after = [line for line in lines if "disk_free_bytes" not in line]
    assert len(after) >= 4 and all(line["rss_bytes"] > 0 for line in after)
    assert [fields["part"] for _, fields in log.warnings] == ["disk"]
    assert "FileNotFoundError" in log.warnings[0][1]["error"]


def test_tensorboard_scalars_from_two_threads_and_a_resume(tmp_path: Path) -> None:
    first = tensorboard_metrics(tmp_path)
    side = threading.Thread(target=lambda: [first.scalars("system", s, {"x": s}) for s in range(1, 201)])
    side.start()
    for step in range(1, 21):
        first.write("train", step, loss=float(step), note="text", flag=True)
    side.join()
    first.close()
    first.write("train", 21, loss=21.0)  # after close: the JSON line only, no writer reopened
    time.sleep(1.01 - time.time() % 1)  # event files are read in name order, which starts with the second
    second = tensorboard_metrics(tmp_path, start_step=10)  # resumed from step 10: steps 11.. are redone
    for step in range(11, 16):
        second.write("train", step, loss=100.0 + step)
    second.close()
    tb = scalars_of(tmp_path / "tb")
    assert set(tb) == {"train/loss", "system/x"}  # strings and booleans are not scalars
    assert tb["train/loss"] == {**{s: float(s) for s in range(1, 11)}, **{s: 100.0 + s for s in range(11, 16)}}
    assert sorted(tb["system/x"]) == list(range(1, 11))  # the first start's, up to the resume point
    assert len(read_jsonl(tmp_path / "metrics" / "train.jsonl")) == 26


def test_without_the_tensorboard_package_metrics_go_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tensorboard_tracker, "summary_writer", lambda: None)
    metrics = tensorboard_metrics(tmp_path)
    metrics.write("train", 1, loss=1.0)
    metrics.close()
    assert read_jsonl(tmp_path / "metrics" / "train.jsonl")[0]["loss"] == 1.0
    assert not (tmp_path / "tb").exists()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # tensorboard's writer thread
def test_a_full_disk_costs_tensorboard_events_not_training(tmp_path: Path, tmpfs) -> None:
    tmpfs(tmp_path / "small", 64)
    with structlog.testing.capture_logs() as logs:
        metrics = tensorboard_metrics(tmp_path, tb=tmp_path / "small" / "tb")
        step, deadline = 0, time.monotonic() + 20
        while not logs and time.monotonic() < deadline:
            for _ in range(100):
                step += 1
                metrics.write("train", step, loss=1.0, lr=2.0)  # never raises, never waits
            time.sleep(0.01)  # the writer's thread meets the full disk; the relay hears of it
        metrics.write("train", step + 1, loss=1.0)
        metrics.close()
    failed = [e for e in logs if e["event"] == "tracker: log failed; training goes on, retrying"]
    assert len(failed) == 1 and failed[0]["tracker"] == "tensorboard", logs  # said once, not per retry
    assert "No space left" in failed[0]["error"]
    assert read_jsonl(tmp_path / "metrics" / "train.jsonl")[-1]["step"] == step + 1


def texts_of(tb: Path) -> dict[str, dict[int, str]]:
    acc = EventAccumulator(str(tb), size_guidance={"tensors": 0})
    acc.Reload()
    return {tag.split("/")[0]: {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag)}
            for tag in acc.Tags()["tensors"] if tag.endswith("/text_summary")}


def hparams_of(tb: Path) -> Any:
    """The hparams a session started with (TensorBoard's hparams plugin data: no scalar of its own)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    for file in sorted(tb.iterdir()):
        for event in EventFileLoader(str(file)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "hparams":
                    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    if data.HasField("session_start_info"):
                        return data.session_start_info.hparams
    raise AssertionError(f"no hparams in {tb}")


def test_a_training_run_writes_system_metrics_and_tensorboard_events(tmp_path: Path) -> None:
    result = run(train_cmd(0, "r", tmp_path, "telemetry.system_every_s=0.2", "trainer.max_steps=30",
                           "trainer.sample_every=20", "trainer.sample_tokens=8"))
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "r"
    texts = texts_of(run_dir / "tb")
    assert "max_steps: 30" in texts["config"][0]  # the resolved config, as YAML
    samples = [json.loads(line) for line in (run_dir / "metrics" / "samples.jsonl").read_text().splitlines()]
    assert sorted(texts["samples"]) == sorted({s["step"] for s in samples}) == [20]
    assert samples[0]["text"] in texts["samples"][20]
    assert texts["restarts"][0].startswith("restart: 0")
    assert hparams_of(run_dir / "tb")["trainer.max_steps"].number_value == 30  # beside the final metrics
    train = read_jsonl(run_dir / "metrics" / "train.jsonl")
    system = read_jsonl(run_dir / "metrics" / "system.jsonl")
    network = read_jsonl(run_dir / "metrics" / "network.jsonl")
    assert system and network and all(0 <= line["step"] <= 30 for line in system + network)
    tb = scalars_of(run_dir / "tb")
    assert tb["train/loss"] == pytest.approx({line["step"]: line["loss"] for line in train})
    assert sorted(tb["eval/val_loss"]) == [20, 30]
    assert {"system/rss_bytes", "network/recv_bytes_per_s", "train/tokens_per_sec", "hparam/eval/val_loss"} <= set(tb)
    assert not [tag for tag in tb if tag.startswith("time/")]  # the goodput ledger is not a curve

    off = run(train_cmd(0, "off", tmp_path, "telemetry.tensorboard=false", "trainer.max_steps=10"))
    assert off.returncode == 0, off.stderr[-3000:]
    assert (tmp_path / "off" / "metrics" / "train.jsonl").is_file() and not (tmp_path / "off" / "tb").exists()


def test_cuda_fields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stand-ins for torch.cuda (no GPU here): the fields, and utilisation dropped once NVML is missing."""
    for name, value in (("memory_allocated", 1), ("memory_reserved", 2), ("max_memory_allocated", 3)):
        monkeypatch.setattr(torch.cuda, name, lambda device, value=value: value)
    calls: list[int] = []

    def utilization(device: torch.device) -> int:
        calls.append(1)
        if len(calls) > 1:
            raise ModuleNotFoundError("pynvml")
        return 42

    monkeypatch.setattr(torch.cuda, "utilization", utilization)
    log = Recorder()
    sampler = SystemSampler(tmp_path, 1, 0, torch.device("cuda", 0), tmp_path, log=log)
    memory = {"cuda_allocated_bytes": 1, "cuda_reserved_bytes": 2, "cuda_max_allocated_bytes": 3}
    assert sampler._cuda() == {**memory, "gpu_util_percent": 42}
    assert sampler._cuda() == memory == sampler._cuda()
    assert len(calls) == 2  # asked once more, then never again
    assert not log.warnings
