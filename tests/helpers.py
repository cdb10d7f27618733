"""Launch real training processes (torchrun with gloo, or plain python) and read what they leave."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def train_cmd(nproc: int, run_name: str, runs_root: Path, *overrides: str, config: Path = TINY) -> list[str]:
    """torchrun with `nproc` ranks, or a plain `python -m prefix.train` when nproc is 0."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    entry = ["-m", "prefix.train"] if nproc else [sys.executable, "-m", "prefix.train"]
    return [*(launcher if nproc else []), *entry, "--config", str(config), "--run-name", run_name,
            "--runs-root", str(runs_root), *overrides]


class Launch:
    """A training launch in its own session, as a pod's PID 1 would be."""

    def __init__(self, cmd: list[str], log: Path):
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                         start_new_session=True,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise AssertionError(f"launch did not finish in {timeout}s; log:\n{self.log.read_text()[-3000:]}") from None

    def wait_for_step(self, run_dir: Path, step: int, timeout: float = 180) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = max(losses(run_dir), default=0)
            if done >= step:
                return done
            assert self.proc.poll() is None, f"exited early:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.05)
        raise AssertionError(f"step {step} not reached; log:\n{self.log.read_text()[-3000:]}")

    def sigterm(self) -> None:
        """What Kubernetes does first: SIGTERM to PID 1 (torchrun forwards it to the workers)."""
        self.proc.send_signal(signal.SIGTERM)

    def kill_all(self) -> None:
        """What a container runtime does: SIGKILL every process of the run at once.

        torchrun puts each worker in a session of its own, so the process tree, not the process
        group, is what must be killed.
        """
        try:
            tree = [psutil.Process(self.proc.pid)]
            tree += tree[0].children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for p in tree:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(30)


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


def losses(run_dir: Path) -> dict[int, float]:
    """Loss per step from metrics/train.jsonl; a step redone after a crash keeps its last value."""
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics" / "train.jsonl")}


def checkpoint(run_dir: Path, name: str = "latest.pt") -> dict:
    return torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=True)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ in {different[:5]}"
