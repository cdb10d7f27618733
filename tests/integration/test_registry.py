"""The run registry and RunManager: statuses through real runs, preemptions and kills; reindex; concurrency."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import REPO, Launch, losses, read_jsonl, run, train_cmd

from prefix.runs.registry import Registry

QUICK = ("trainer.max_steps=200", "checkpoint.every_steps=10", "trainer.eval_every=0")


def cli(*args: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "prefix.cli", *args])


def by_run(rows: list[dict]) -> dict[str, dict]:
    return {r["run"]: r for r in rows}


def test_registry_follows_runs_preemptions_and_kills_and_reindexes(tmp_path: Path) -> None:
    done = run(train_cmd(0, "done", tmp_path, "trainer.max_steps=5", "--experiment", "exp-a"))
    assert done.returncode == 0, done.stderr[-3000:]

    preempted = Launch(train_cmd(0, "pre", tmp_path, *QUICK, "--experiment", "exp-b"), tmp_path / "log1")
    preempted.wait_for_step(tmp_path / "pre", 15)
    preempted.sigterm()
    preempted.wait()
    killed = Launch(train_cmd(0, "kill", tmp_path, *QUICK, "--experiment", "exp-b"), tmp_path / "log2")
    killed.wait_for_step(tmp_path / "kill", 25)
    killed.kill_all()
    heartbeat = json.loads((tmp_path / "kill" / "logs" / "heartbeat.json").read_text())["step"]
    last_kill_step = max(heartbeat, *losses(tmp_path / "kill"))  # a step may end before its loss line

    rows = by_run(Registry(tmp_path).runs())
    assert {name: r["status"] for name, r in rows.items()} == {"done": "completed", "pre": "preempted",
                                                                "kill": "running"}
    assert rows["done"]["exit_code"] == 0 and rows["pre"]["exit_code"] == 143
    assert rows["done"]["step"] == 5 and rows["done"]["target_step"] == 5
    assert [r["run"] for r in Registry(tmp_path).runs()] == ["kill", "pre", "done"], "newest first"
    assert [r["run"] for r in Registry(tmp_path).runs(experiment="exp-b", status="preempted")] == ["pre"]

    for name in ("pre", "kill"):  # resume both to the end
        resumed = run(train_cmd(0, name, tmp_path, *QUICK, "trainer.max_steps=40", "--experiment", "exp-b"))
        assert resumed.returncode == 0, resumed.stderr[-3000:]
    starts = {name: read_jsonl(tmp_path / name / "meta" / "starts.jsonl") for name in ("pre", "kill")}
    assert starts["pre"][1]["previous_end"] == "preempted with a final checkpoint"
    assert starts["pre"][1]["steps_redone"] == 0
    assert starts["kill"][1]["previous_end"] == "killed without a final checkpoint"
    assert starts["kill"][1]["steps_redone"] == last_kill_step - starts["kill"][1]["start_step"] > 0

    listed = cli("runs", "--runs-root", str(tmp_path), "--json")
    before = [json.loads(line) for line in listed.stdout.splitlines()]
    assert {r["run"]: (r["status"], r["restarts"]) for r in before} == {
        "done": ("completed", 0), "pre": ("completed", 1), "kill": ("completed", 1)}
    (tmp_path / "registry.sqlite").unlink()
    for leftover in tmp_path.glob("registry.sqlite-*"):
        leftover.unlink()
    reindexed = cli("runs", "--runs-root", str(tmp_path), "--reindex", "--json")
    assert reindexed.returncode == 0, reindexed.stderr
    assert [json.loads(line) for line in reindexed.stdout.splitlines()] == before
    table = cli("runs", "--runs-root", str(tmp_path)).stdout
    assert table.splitlines()[0].split()[:3] == ["RUN", "EXPERIMENT", "STATUS"] and "exp-b" in table

    status = cli("status", "pre", "--runs-root", str(tmp_path))
    assert status.returncode == 0 and "40 / 40" in status.stdout and "preempted with a final checkpoint" in status.stdout
    missing = cli("status", "nope", "--runs-root", str(tmp_path))
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and "Traceback" not in missing.stderr


WRITER = """
import sys, time
from pathlib import Path
from prefix.runs.registry import Registry
registry, name = Registry(Path(sys.argv[1]), timeout_s=30), sys.argv[2]
for step in range(300):
    registry.update({"run": name, "experiment": "x", "status": "running", "created": 1.0, "updated": time.time(),
                     "step": step, "target_step": 299, "restarts": 0})
"""


def test_two_runs_writing_at_once_both_succeed(tmp_path: Path) -> None:
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), name], cwd=REPO,
                                stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    for w in writers:
        assert w.wait(120) == 0, w.stderr.read()
    assert {r["run"]: r["step"] for r in Registry(tmp_path).runs()} == {"a": 299, "b": 299}


def test_an_unusable_registry_never_stops_training(tmp_path: Path) -> None:
    (tmp_path / "registry.sqlite").mkdir()  # not a database: every write fails
    result = run(train_cmd(0, "r", tmp_path, "trainer.max_steps=5"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("run registry not updated") == 1
    assert json.loads((tmp_path / "r" / "meta" / "run.json").read_text())["status"] == "completed"


def test_sample_from_a_runs_latest_checkpoint(tmp_path: Path) -> None:
    trained = run(train_cmd(0, "r", tmp_path, "trainer.max_steps=10", "trainer.sample_tokens=30",
                            "trainer.sample_prompt=import", "trainer.sample_every=5",
                            "trainer.sample_prompts=[import, 'def ']"))
    assert trained.returncode == 0, trained.stderr[-3000:]
    periodic = read_jsonl(tmp_path / "r" / "metrics" / "samples.jsonl")
    assert [(s["step"], s["prompt"]) for s in periodic] == [(5, "import"), (5, "def "), (10, "import"), (10, "def ")]
    assert all(s["text"].startswith(s["prompt"]) and len(s["text"]) > len(s["prompt"]) for s in periodic)
    in_run = trained.stdout.split("--- sample from the trained model ---\n")[1].split("\n---")[0]
    args = ("sample", "r", "--runs-root", str(tmp_path), "--prompt", "import", "--tokens", "30", "--seed", "1337")
    sampled = cli(*args)
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout[:-1] == in_run, "same weights, tokenizer and seed: the same text as the run's"
    assert "step 10 (latest.pt)" in sampled.stderr
    missing = cli("sample", "nope", "--runs-root", str(tmp_path))
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and "Traceback" not in missing.stderr
