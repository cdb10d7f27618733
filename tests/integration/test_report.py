"""`prefix report`: figures and summary of a real run preempted once and killed once, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from helpers import Launch, assert_clean_exit_2, losses, read_jsonl, run, train_cmd
from PIL import Image

from prefix.runs import read_jsonl as report_jsonl
from prefix.tools.report import by_step, by_time

STEPS = ("trainer.max_steps=60", "checkpoint.every_steps=10", "trainer.eval_every=10")
MARKER_RGB = {"preempted with a final checkpoint": (255, 127, 14), "killed without a final checkpoint": (214, 39, 40)}


def report(*args: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "prefix.cli", "report", *args])


def marker_drawn(image: np.ndarray, x: float, rgb: tuple[int, int, int]) -> bool:
    """A vertical line of `rgb` at pixel column x: most of the image's height, within one pixel."""
    columns = image[:, max(0, round(x) - 1):round(x) + 2, :3].astype(int)
    close = (np.abs(columns - np.array(rgb)).sum(axis=2) < 60).any(axis=1)
    return close.sum() > 0.5 * image.shape[0]


def test_report_of_a_preempted_and_killed_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    first = Launch(train_cmd(0, "r", tmp_path, *STEPS), tmp_path / "log1")
    first.wait_for_step(run_dir, 12)
    first.sigterm()
    first.wait()
    state = json.loads((run_dir / "meta" / "run.json").read_text())
    assert state["status"] == "preempted", state
    second = Launch(train_cmd(0, "r", tmp_path, *STEPS), tmp_path / "log2")
    preempted_at = state["step"]
    second.wait_for_step(run_dir, preempted_at + 17)  # past a checkpoint of its own: the markers stay apart
    second.kill_all()
    last = run(train_cmd(0, "r", tmp_path, *STEPS))
    assert last.returncode == 0, last.stderr[-3000:]
    with open(run_dir / "metrics" / "train.jsonl", "a") as f:
        f.write('{"step": 61, "time": 17')  # a line torn by a kill mid-write

    result = report("r", "--runs-root", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    out = run_dir / "report"
    assert result.stdout.split() == [str(out / name) for name in (
        "loss.png", "loss_time.png", "throughput.png", "summary.md", "report.json")]

    facts = json.loads((out / "report.json").read_text())
    starts = read_jsonl(run_dir / "meta" / "starts.jsonl")
    assert [(r["start_step"], r["previous_end"]) for r in facts["restarts"]] == [
        (starts[1]["start_step"], "preempted with a final checkpoint"),
        (starts[2]["start_step"], "killed without a final checkpoint")]
    assert facts["restarts"][1]["steps_redone"] == starts[2]["steps_redone"] > 0
    assert facts["final_train_loss"] == {"step": 60, "loss": losses(run_dir)[60]}
    assert all(a <= b for a, b in facts["gaps_hours"]) and len(facts["gaps_hours"]) == 2

    for name in ("loss.png", "loss_time.png", "throughput.png"):
        image = np.asarray(Image.open(out / name).convert("RGB"))
        assert image.shape == (500, 1000, 3), name
        assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50 and image.std() > 10, f"{name} looks blank"
        xs = facts["marker_x_pixels"][name]
        assert len(xs) == 2 and abs(xs[0] - xs[1]) > 3, name
        for x, restart in zip(xs, facts["restarts"], strict=True):
            assert marker_drawn(image, x, MARKER_RGB[restart["previous_end"]]), (name, x, restart)

    summary = (out / "summary.md").read_text()
    assert "| restarts | 2 |" in summary and "| steps | 60 / 60 |" in summary
    assert "killed without a final checkpoint" in summary and "![loss](loss.png)" in summary


def test_redone_steps_keep_their_last_line_and_time_plots_keep_all(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"step": 1, "time": 10, "loss": 5}\n{"step": 2, "time": 11, "loss": 4}\n'
                    '{"step": 2, "time": 30, "loss": 3.5}\n{"step": 3, "time": 31, "loss": 3}\n{"step": 4, "ti')
    rows = report_jsonl(path)
    assert by_step(rows, "loss") == ([1, 2, 3], [5.0, 3.5, 3.0])
    assert by_time(rows, "loss") == [(10.0, 5.0), (11.0, 4.0), (30.0, 3.5), (31.0, 3.0)]


def test_errors_write_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert_clean_exit_2(report("nope", "--runs-root", str(root)), "meta/run.json")
    assert not root.exists()
    (root / "empty" / "meta").mkdir(parents=True)
    (root / "empty" / "meta" / "run.json").write_text('{"run": "empty", "status": "running", "step": 0}')
    assert_clean_exit_2(report("empty", "--runs-root", str(root)), "no training metrics yet")
    assert sorted(p.name for p in (root / "empty").iterdir()) == ["meta"]
