"""The W&B tracker driven through the real `Metrics` and relay, with the real wandb library offline.

What W&B holds is read back by W&B's own reader (`wandb leet inspect`), not by the tracker's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from helpers import wandb_folders, wandb_runs

pytest.importorskip("wandb")

from prefix.config import WandbConfig  # noqa: E402
from prefix.telemetry import Metrics, RunInfo  # noqa: E402
from prefix.telemetry.trackers import Record  # noqa: E402
from prefix.telemetry.wandb_logs import held_in_logs, transaction_log  # noqa: E402
from prefix.telemetry.wandb_run import MARKS, WandbTracker  # noqa: E402

CREATED = 1_700_000_000.0
CONFIG = {"trainer": {"max_steps": 12, "lr": 0.003}, "model": {"d_model": 64}}


@pytest.fixture(autouse=True)
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """wandb's own folders in the test's tmp, never the home directory; offline runs under the run directory."""
    for name in ("WANDB_DIR", "WANDB_MODE", "WANDB_RUN_ID", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    for name, sub in (("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config")):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / sub))
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")


def start(run_dir: Path, restart: int, steps: range, completed: bool = False, mode: str = "offline") -> None:
    """One start of a prefix run as `RunManager` makes it: its line in meta/starts.jsonl, then metrics."""
    (run_dir / "meta").mkdir(parents=True, exist_ok=True)
    entry = {"time": time.time(), "start_step": steps.start - 1, "world_size": 2, "restart": restart, "host": "h",
             "config_changes": {}}
    if restart:
        entry.update(previous_end="killed", steps_redone=3)
    with open(run_dir / "meta" / "starts.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")
    metrics = Metrics(run_dir / "metrics", enabled=True, trackers=[WandbTracker(WandbConfig(project="p", mode=mode))])
    metrics.start(RunInfo("r", run_dir, "exp", CREATED, CONFIG, steps.start - 1, restart, entry))
    for step in steps:
        metrics.write("train", step, loss=1.0 / step, lr=0.1 * step, tokens_per_s=1000.0 + restart)
        if step % 5 == 0:
            metrics.write("eval", step, val_loss=2.0 / step)
            for prompt in ("def ", "class "):
                metrics.write("samples", step, prompt=prompt, text=f"{prompt}at {step}")
    metrics.close({"train/loss": 1.0 / steps[-1]} if completed else None, [])
    if mode == "offline":
        wait_for_log(run_dir, restart)


def wait_for_log(run_dir: Path, restart: int) -> None:
    """Until W&B has written the start's transaction log to the end (wandb-core closes it a moment after
    `finish` returns; a start's process waits for that in wandb's exit hook, this test process does not)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        logs = [log for folder in wandb_folders(run_dir / "wandb") for log in folder.glob("*.wandb")]
        if len(logs) > restart and any(r.WhichOneof("record_type") == "exit" for r in transaction_log(logs[-1])):
            return
        time.sleep(0.05)
    raise AssertionError("W&B did not close its transaction log")


def wandb_view(run_dir: Path) -> list[list[dict]]:
    """Each start's records (its offline run folder, in start order), as W&B's reader gives them."""
    return wandb_runs(run_dir / "wandb")


def rows(starts: list[list[dict]]) -> list[dict]:
    return [r["history"]["item"] for records in starts for r in records if r["type"] == "history"]


def test_every_start_continues_one_run_and_each_step_is_logged_once(tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    start(run_dir, 0, range(1, 11))
    start(run_dir, 1, range(7, 13), completed=True)  # resumed from a checkpoint at 6: steps 7-10 redone

    starts = wandb_view(run_dir)
    assert len(starts) == 2
    runs = [r["run"] for records in starts for r in records if r["type"] == "run"]
    uid = RunInfo("r", run_dir, "exp", CREATED, CONFIG).uid
    assert {r["run_id"] for r in runs} == {uid} and all(r["resume"] for r in runs)
    assert all(r["project"] == "p" and r["run_group"] == "exp" and r["display_name"] == "r" for r in runs)
    configs = [r["config"]["update"] for records in starts for r in records if r["type"] == "config"]
    for config in [r["config"]["update"] for r in runs] + configs:
        assert {k: v for k, v in config.items() if k != "_wandb"} == CONFIG
    train = [(row["trainer/step"], row["train/loss"], row["train/tokens_per_s"]) for row in rows(starts)
             if "train/loss" in row]
    assert sorted(step for step, _, _ in train) == list(range(1, 13)), "every step once, none twice"
    assert all(loss == 1.0 / step for step, loss, _ in train)
    assert {step for step, _, speed in train if speed == 1000.0} == set(range(1, 11)), "the first attempt is kept"
    assert sorted(row["trainer/step"] for row in rows(starts) if "eval/val_loss" in row) == [5, 10]
    tables = [row for row in rows(starts) if row.get("samples/text._type") == "table-file"]
    assert sorted((row["trainer/step"], row["samples/text.nrows"]) for row in tables) == [(5, 2), (10, 2)]
    assert [row["restart/count"] for row in rows(starts) if "restart/count" in row] == [0, 1]
    exits = [[r for r in records if r["type"] in ("preempting", "exit")] for records in starts]
    assert [[r["type"] for r in e] for e in exits] == [["preempting", "exit"], ["exit"]]
    assert exits[0][-1]["exit"]["exit_code"] == 143, "a stopped start is preempted, not failed"
    assert "exit_code" not in exits[1][-1]["exit"] or exits[1][-1]["exit"]["exit_code"] == 0


def test_rows_a_kill_cut_from_the_log_are_sent_again(tmp_path: Path) -> None:
    """A SIGKILL loses the transaction log's unwritten tail, which the relay's cursor counts as delivered:
    the next start reads what the log really holds and sends the rest from metrics/ (and the lost restart
    event from meta/starts.jsonl)."""
    run_dir = tmp_path / "r"
    start(run_dir, 0, range(1, 11))
    (log,) = (run_dir / "wandb").glob("offline-run-*/*.wandb")
    ours = [r for r in transaction_log(log) if r.WhichOneof("record_type") == "history"]
    assert len(ours) == len(rows(wandb_view(run_dir))), "the tracker's reader agrees with W&B's"
    cursor = json.loads((run_dir / "meta" / "trackers.json").read_text())["wandb"]["held"]
    assert cursor["train"] == 10
    data = log.read_bytes()
    log.write_bytes(data[:len(data) // 5])  # a tail lost, and a chunk torn in the middle
    held, _ = held_in_logs(run_dir / "wandb", RunInfo("r", run_dir, "exp", CREATED, CONFIG).uid, MARKS, {})
    assert held.get("train", -1) < 10 and held.get("restart", -1) < 0

    start(run_dir, 1, range(9, 13), completed=True)
    everything = rows(wandb_view(run_dir))
    assert sorted(row["trainer/step"] for row in everything if "train/loss" in row) == list(range(1, 13))
    assert sorted(row["trainer/step"] for row in everything if "eval/val_loss" in row) == [5, 10]
    assert [row["restart/count"] for row in everything if "restart/count" in row] == [0, 1]


def test_a_steps_samples_may_come_in_batches_but_each_prompt_is_logged_once(tmp_path: Path) -> None:
    """The relay may split a step's prompts over batches, and retries a batch that failed; a later start
    that redoes a sample step held before must not log it again."""
    run_dir = tmp_path / "r"
    (run_dir / "meta").mkdir(parents=True)
    info = RunInfo("r", run_dir, "exp", CREATED, CONFIG)

    def sample(step: int, prompt: str) -> Record:
        return Record("samples", step, {"prompt": prompt, "text": f"{prompt}{step}"}, time.time())

    first = WandbTracker(WandbConfig(project="p", mode="offline"))
    first.open(info, {})
    first.log([sample(5, "a")])
    first.log([sample(5, "b")])
    first.log([sample(5, "a"), sample(5, "b")])  # a batch sent again
    first.close()
    wait_for_log(run_dir, 0)
    again = WandbTracker(WandbConfig(project="p", mode="offline"))
    again.open(RunInfo("r", run_dir, "exp", CREATED, CONFIG, start_step=3, restarts=1), first.state())
    again.log([sample(5, "a"), sample(10, "a")])  # step 5 redone after a resume from step 3
    again.close()
    wait_for_log(run_dir, 1)

    tables = [row for row in rows(wandb_view(run_dir)) if "samples/text._type" in row]
    assert sorted((row["trainer/step"], row["samples/text.nrows"]) for row in tables) == [(5, 1), (5, 1), (10, 1)]


def test_disabled_mode_writes_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    start(run_dir, 0, range(1, 4), mode="disabled")
    assert not list(run_dir.glob("wandb/*run-*"))
    assert len((run_dir / "metrics" / "train.jsonl").read_text().splitlines()) == 3
