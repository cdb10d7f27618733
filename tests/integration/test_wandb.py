"""W&B offline across a SIGKILL, a SIGTERM and the end: one W&B run, every step once.

Real torchrun (2 ranks, gloo), the real wandb library offline, its files read back by W&B's own
reader (`wandb leet inspect`). The SIGKILL takes wandb-core down with the workers, so the killed
start's transaction log loses its unwritten tail: the next start must find that out and send those
rows again, while the steps it redoes must not appear twice.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from helpers import Launch, losses, read_jsonl, run, train_cmd, wandb_folders, wandb_runs

pytest.importorskip("wandb")

from prefix.telemetry import RunInfo  # noqa: E402

STEPS = 200
SETTINGS = (f"trainer.max_steps={STEPS}", "checkpoint.every_steps=20", "trainer.eval_every=100",
            "trainer.sample_every=100", "trainer.sample_tokens=8", "telemetry.system_every_s=2",
            "telemetry.wandb.project=prefix-test", "telemetry.wandb.mode=offline")


def wait_for_wandb(run_dir: Path, step: int, launch: Launch, timeout: float = 180) -> int:
    """Until the relay has handed W&B the train steps up to `step` (its cursor in meta/trackers.json)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            held = json.loads((run_dir / "meta" / "trackers.json").read_text())["wandb"]["held"].get("train", -1)
        except (OSError, ValueError, KeyError):
            held = -1
        if held >= step:
            return held
        assert launch.proc.poll() is None, f"exited early:\n{launch.log.read_text()[-3000:]}"
        time.sleep(0.05)
    raise AssertionError(f"W&B never got step {step}; log:\n{launch.log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> tuple[Path, int]:
    """Start 1 SIGKILLed once W&B holds some steps, start 2 SIGTERMed after redoing steps, start 3 runs to
    the end. Returns the run directory and the steps the relay had handed W&B when the kill landed."""
    root = tmp_path_factory.mktemp("wandb")
    run_dir = root / "r"
    with pytest.MonkeyPatch.context() as env:  # wandb's own folders in tmp, never the home directory
        for name in ("WANDB_DIR", "WANDB_MODE", "WANDB_RUN_ID", "WANDB_PROJECT"):
            env.delenv(name, raising=False)
        for name, sub in (("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config")):
            env.setenv(name, str(root / "wandb-home" / sub))
        env.setenv("WANDB_ERROR_REPORTING", "false")

        first = Launch(train_cmd(2, "r", root, *SETTINGS), root / "log1")
        handed = wait_for_wandb(run_dir, random.randint(10, 40), first)
        first.kill_all()
        killed_at = max(losses(run_dir))
        second = Launch(train_cmd(2, "r", root, *SETTINGS), root / "log2")
        second.wait_for_step(run_dir, killed_at + 3)
        second.sigterm()
        second.wait()  # torchrun's own exit code on SIGTERM; the workers' shows in W&B's exit record
        third = Launch(train_cmd(2, "r", root, *SETTINGS), root / "log3")
        assert third.wait() == 0, (root / "log3").read_text()[-3000:]
    return run_dir, handed


@pytest.fixture(scope="module")
def run_dir(killed: tuple[Path, int]) -> Path:
    return killed[0]


@pytest.fixture(scope="module")
def starts(run_dir: Path) -> list[list[dict]]:
    """Each start's records, from its offline run folder (in start order), as W&B reads them."""
    return wandb_runs(run_dir / "wandb")


def rows(records: list[dict]) -> list[dict]:
    return [r["history"]["item"] for r in records if r["type"] == "history"]


def test_every_start_continues_the_same_wandb_run_with_the_resolved_config(run_dir: Path, starts) -> None:
    assert len(starts) == len(read_jsonl(run_dir / "meta" / "starts.jsonl")) == 3, "one W&B folder per start: rank 0"
    created = json.loads((run_dir / "meta" / "run.json").read_text())["created"]
    uid = RunInfo("r", run_dir, "", created, {}).uid
    runs = [r["run"] for records in starts for r in records if r["type"] == "run"]
    assert {r["run_id"] for r in runs} == {uid} and all(r["resume"] and r["project"] == "prefix-test" for r in runs)
    resolved = json.loads(json.dumps(yaml.safe_load((run_dir / "meta" / "config.yaml").read_text())))
    for records in starts[1:]:  # the killed start's log may have lost even its run record
        configs = [r["run"]["config"]["update"] for r in records if r["type"] == "run"]
        configs += [r["config"]["update"] for r in records if r["type"] == "config"]
        assert configs and all({k: v for k, v in c.items() if k != "_wandb"} == resolved for c in configs)
    ends = [[r for r in records if r["type"] in ("preempting", "exit")] for records in starts]
    assert ends[0] == [], "SIGKILLed: no exit record"
    assert [r["type"] for r in ends[1]] == ["preempting", "exit"] and ends[1][-1]["exit"]["exit_code"] == 143
    assert [r["type"] for r in ends[2]] == ["exit"] and ends[2][-1]["exit"].get("exit_code", 0) == 0
    summary = {k: v for r in starts[2] if r["type"] == "summary" for k, v in r["summary"]["update"].items()}
    assert summary["train/loss"] == losses(run_dir)[STEPS]
    sync = run([sys.executable, "-m", "wandb", "sync", "--dry-run", str(run_dir / "wandb")],
               env={"WANDB_MODE": "offline", "WANDB_ERROR_REPORTING": "false"})
    assert "Would sync 3 run(s)" in sync.stdout + sync.stderr, "`wandb sync` takes every start's folder"


def test_every_step_is_in_wandb_once_with_the_values_of_the_metrics_files(killed, run_dir: Path, starts) -> None:
    in_log = [row["trainer/step"] for row in rows(starts[0]) if "train/loss" in row]
    assert len(in_log) < killed[1], "the kill must cut rows W&B had been handed, for this test to mean anything"
    redone = read_jsonl(run_dir / "meta" / "starts.jsonl")[1]["steps_redone"]
    assert redone > 0, "the SIGKILL must leave steps to redo"

    everything = [row for records in starts for row in rows(records)]
    train = [row for row in everything if "train/loss" in row]
    assert sorted(row["trainer/step"] for row in train) == list(range(1, STEPS + 1)), "each step once"
    lines: dict[int, list[dict]] = {}
    for line in read_jsonl(run_dir / "metrics" / "train.jsonl"):
        lines.setdefault(line["step"], []).append({f"train/{k}": v for k, v in line.items() if k not in ("step", "time")})
    for row in train:
        ours = {k: v for k, v in row.items() if k.startswith("train/") and k != "train/step"}
        assert any(ours == {k: v for k, v in line.items() if isinstance(v, (int, float))} for line in lines[row["trainer/step"]])
    for split in ("eval", "checkpoint", "system", "samples"):
        steps = Counter(row[f"{split}/step"] for row in everything if f"{split}/step" in row)
        assert steps and max(steps.values()) == 1, f"{split}: some step is in W&B twice: {steps}"
    assert sorted(row["trainer/step"] for row in everything if "eval/val_loss" in row) == [100, 200]


def test_samples_are_tables_and_restarts_are_events(run_dir: Path, starts) -> None:
    tables = [(records, row) for records in starts for row in rows(records) if "samples/text._type" in row]
    assert sorted(row["trainer/step"] for _, row in tables) == [100, 200]
    folders = wandb_folders(run_dir / "wandb")
    for row in (row for _, row in tables):
        (table,) = [json.loads((f / "files" / row["samples/text.path"]).read_text()) for f in folders
                    if (f / "files" / row["samples/text.path"]).is_file()]
        assert table["columns"] == ["step", "prompt", "text"] and table["data"][0][:2] == [row["trainer/step"], "def "]
    starts_jsonl = read_jsonl(run_dir / "meta" / "starts.jsonl")
    events = sorted((row["restart/count"], row["trainer/step"]) for records in starts for row in rows(records)
                    if "restart/count" in row)
    assert events == [(s["restart"], s["start_step"]) for s in starts_jsonl], "every start once, at its step"
    assert all("restart/event._type" in row for records in starts for row in rows(records) if "restart/count" in row)
