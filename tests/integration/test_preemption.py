"""Signals: deferred during training, prompt before it, a second SIGINT exits at once."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import REPO, Launch, checkpoint, isolation_prefix, losses, run, train_cmd


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
    assert checkpoint(run_dir).step == 10


def test_exit_promptly_runs_the_exit_hooks_and_joins_the_threads():
    result = python(
        "import atexit, threading, time\n"
        "from prefix.preemption import exit_promptly\n"
        "atexit.register(lambda: print('atexit handler ran, unflushed'))\n"
        "threading._register_atexit(lambda: print('threading hook ran', flush=True))\n"
        "threading.Thread(target=lambda: (time.sleep(0.5), print('thread finished', flush=True))).start()\n"
        "exit_promptly(143)\n")
    assert result.returncode == 143, result.stderr
    assert result.stdout.splitlines() == ["threading hook ran", "thread finished", "atexit handler ran, unflushed"]


def test_sigterm_exit_leaves_everything_written_and_nothing_behind(tmp_path):
    """The process leaves without Python's module teardown (1-2 s): every log line, the registry and the
    final checkpoint are out, and streaming's shared memory is gone. Checked in a private /dev/shm, so
    the segments seen are this run's alone."""
    isolate = isolation_prefix()
    if isolate is None:
        pytest.skip("needs unshare with a mount namespace (a private /dev/shm)")
    pid_file, run_dir = tmp_path / "pid", tmp_path / "r"
    train = shlex.join(train_cmd(0, "r", tmp_path, "trainer.max_steps=100000", "trainer.eval_every=0"))
    script = (f"mount -t tmpfs tmpfs /dev/shm && {{ {train} & echo $! > {pid_file}; wait $!; echo exit=$?; "
              "echo shm=$(ls -A /dev/shm); }")
    log = tmp_path / "log"
    with open(log, "w") as out:
        shell = subprocess.Popen([*isolate, "sh", "-c", script], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while max(losses(run_dir), default=0) < 3:
            assert time.monotonic() < deadline and shell.poll() is None, "no step 3"
            time.sleep(0.2)
        subprocess.run(["kill", "-TERM", pid_file.read_text().strip()], check=True)
        shell.wait(timeout=120)
    finally:
        if shell.poll() is None:
            os.killpg(shell.pid, signal.SIGKILL)
    out = log.read_text()
    assert "exit=143" in out, out[-3000:]
    left = [line for line in out.splitlines() if line.startswith("shm=")]
    assert left == ["shm="], f"shared memory left behind: {left}"
    events = [json.loads(line)["event"] for line in (run_dir / "logs" / "rank0.jsonl").read_text().splitlines()]
    assert events[-1] == "stopped by signal after final checkpoint"
    assert json.loads((run_dir / "meta" / "run.json").read_text())["status"] == "preempted"
    assert checkpoint(run_dir).step == max(losses(run_dir))
