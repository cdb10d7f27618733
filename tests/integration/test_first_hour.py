"""What a new user meets in the first hour, each reproduced once when the project was tried as they would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY, run, train_cmd

from prefix.runs.registry import Registry

QUICK = ("trainer.eval_every=0", "trainer.sample_tokens=0", "checkpoint.every_steps=2")


def cli(*args: str, cwd: Path | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefix.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 4-step run `tiny`; returns its runs root."""
    root = tmp_path_factory.mktemp("runs")
    result = run(train_cmd(0, "tiny", root, "trainer.max_steps=4", *QUICK))
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def test_sample_without_a_prompt_starts_a_new_document(trained):
    result = cli("sample", "tiny", "--runs-root", str(trained), "--tokens", "12")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stdout.strip(), "some text was generated"


def test_a_finished_run_started_with_a_changed_config_says_what_changed_and_how_to_go_on(trained):
    result = run(train_cmd(0, "tiny", trained, "trainer.max_steps=4", "trainer.lr=0.001", *QUICK))
    assert result.returncode == 0, result.stderr[-3000:]
    said = " ".join(result.stderr.split())
    assert "run already finished at step 4" in said and "trainer.lr 0.003 → 0.001" in said, said[-2000:]
    assert "trainer.max_steps=<more than 4>" in said and "new --run-name" in said


def test_a_restart_from_another_config_path_keeps_the_experiment(tmp_path):
    moved = tmp_path / "elsewhere" / "other-name.yaml"
    moved.parent.mkdir()
    shutil.copy(TINY, moved)
    assert run(train_cmd(0, "r", tmp_path, "trainer.max_steps=2", *QUICK)).returncode == 0
    result = run(train_cmd(0, "r", tmp_path, "trainer.max_steps=4", *QUICK, config=moved))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "r" / "meta" / "run.json").read_text())["experiment"] == "tiny"
    assert [r["experiment"] for r in Registry(tmp_path).runs()] == ["tiny"]
    relabelled = run(train_cmd(0, "r", tmp_path, "trainer.max_steps=6", "--experiment", "ablation", *QUICK))
    assert relabelled.returncode == 0 and [r["experiment"] for r in Registry(tmp_path).runs()] == ["ablation"]


def test_runs_into_a_reader_that_went_away_ends_quietly(trained):
    """`prefix runs | head`: the reader closed the pipe; no BrokenPipeError traceback, 141 like a shell tool."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "prefix.cli", "runs", "--runs-root", str(trained)],
                                stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert result.returncode == 141 and "Traceback" not in result.stderr, result.stderr


def test_chaos_and_simulate_run_from_any_folder(tmp_path):
    """They find configs/, k8s/ and runai/ of the installation, not of the working folder."""
    chaos = cli("chaos", "--kills", "0", "--runs-root", str(tmp_path / "chaos"), "trainer.max_steps=2",
                cwd=tmp_path)
    assert chaos.returncode == 0 and "PASS" in chaos.stdout, chaos.stdout + chaos.stderr[-2000:]
    code = ("from prefix.tools import simulate; "
            "print(simulate.from_manifest('r', ['x']).command[-1], simulate.from_submit_script('r', ['x']).grace)")
    pods = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert pods.returncode == 0 and "-m prefix.train --run-name r x" in pods.stdout, pods.stderr[-2000:]
