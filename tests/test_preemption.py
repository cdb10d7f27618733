"""Signals: deferred during training, prompt before it, a second SIGINT exits at once."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import torch
from helpers import REPO, Launch, checkpoint, losses, run, train_cmd


def python(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_second_sigint_exits_at_once():
    result = python(
        "import os, signal, time\n"
        "from prefix.preemption import Preemption\n"
        "p = Preemption()\n"
        "with p.armed():\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    assert p.requested\n"
        "    print('first SIGINT only set the flag', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(10)\n"
        "    print('still running')\n")
    assert "first SIGINT only set the flag" in result.stdout
    assert "still running" not in result.stdout
    assert result.returncode == 128 + signal.SIGINT


def test_signal_during_a_checkpoint_write_lets_it_finish(tmp_path):
    result = python(
        "import os, signal, threading, torch\n"
        "from pathlib import Path\n"
        "from prefix.checkpoint import Checkpointer\n"
        "from prefix.config import CheckpointConfig\n"
        "from prefix.distributed import World\n"
        "from prefix.preemption import Preemption\n"
        "p = Preemption()\n"
        f"ck = Checkpointer(Path({str(tmp_path)!r}), World(), CheckpointConfig())\n"
        "big = {'w': torch.randn(64, 1024, 1024)}\n"
        "threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM)).start()\n"
        "with p.armed():\n"
        "    ck.save(1, lambda: big, {})\n"
        "print('requested', p.requested)\n")
    assert result.returncode == 0, result.stderr
    assert "requested True" in result.stdout
    state = torch.load(tmp_path / "latest.pt", weights_only=True)
    assert state["step"] == 1 and state["w"].shape == (64, 1024, 1024)


def test_sigterm_before_first_step_exits_promptly_and_changes_nothing(tmp_path):
    run_dir = tmp_path / "r"
    done = run(train_cmd(2, "r", tmp_path, "trainer.max_steps=10", "trainer.eval_every=0"))
    assert done.returncode == 0
    before = {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()}

    again = Launch(train_cmd(2, "r", tmp_path, "trainer.max_steps=30", "trainer.eval_every=0"), tmp_path / "log")
    time.sleep(3)  # workers are importing and setting up
    assert not losses(run_dir).keys() - set(range(1, 11)), "no new step yet"
    started = time.monotonic()
    again.sigterm()
    again.wait(60)
    assert time.monotonic() - started < 30, "stops well inside torchrun's shutdown timeout"
    after = {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()}
    assert after == before
    assert checkpoint(run_dir)["step"] == 10
