"""Launch real training processes (torchrun with gloo, or plain python) and read what they leave."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from prefix.state import TrainState, read_verified
from prefix.tools import processes
from prefix.tools.processes import ProcessTree

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def train_cmd(nproc: int, run_name: str, runs_root: Path, *overrides: str, config: Path = TINY,
              launcher: bool = False) -> list[str]:
    """torchrun with `nproc` ranks (under `prefix launch` with `launcher`: the workers' exit code), or a plain
    `python -m prefix.train` when nproc is 0."""
    return processes.train_cmd(nproc, run_name, runs_root, config, *overrides, launcher=launcher)


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
        group, is what must be killed (see `prefix.tools.processes.ProcessTree`).
        """
        ProcessTree(self.proc.pid).kill()
        self.proc.wait(30)


def uninterrupted(root: Path, name: str, *settings: str) -> Path:
    """A 2-rank run of `settings` trained to the end without a stop: what a stopped run must equal."""
    launch = Launch(train_cmd(2, name, root, *settings), root / "log")
    assert launch.wait() == 0, (root / "log").read_text()[-3000:]
    return root / name


def run(cmd: list[str], timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on (for a test's server, or for a server that is down)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunsCode:
    """What a crafted checkpoint smuggles in: unpickling it calls os.system (touching `marker`)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def assert_clean_exit_2(result: subprocess.CompletedProcess, fragment: str) -> None:
    """Exit code 2, exactly one `error:` line that contains `fragment`, no traceback."""
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def assert_workers_exit_2(result: subprocess.CompletedProcess, fragment: str) -> None:
    """Under torchrun: a worker exited 2 with an `error:` line containing `fragment`, no worker traceback.

    torchrun itself exits 1 and prints its own traceback (ChildFailedError) around the summary.
    """
    assert result.returncode != 0
    assert "exitcode:2" in result.stderr.replace(" ", ""), result.stderr[-3000:]
    assert any(fragment in line for line in result.stderr.splitlines() if line.startswith("error:")), result.stderr
    tracebacks = result.stderr.count("Traceback")
    assert tracebacks == result.stderr.count("ChildFailedError:"), result.stderr[-5000:]


def read_jsonl(path: Path) -> list[dict]:
    """Every line of a run's .jsonl file. Stricter than `prefix.runs.read_jsonl`, which skips any line that
    does not parse: here only a line torn by a kill (no closing brace) is skipped, and any other line
    that is not JSON fails the test, as the metrics contract says it must never be written."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


def wandb_records(run_folder: Path) -> list[dict]:
    """The records of a W&B run folder's `.wandb` transaction log, read by W&B's own reader
    (`wandb leet inspect --json`: one JSON object per record, offline, nothing sent anywhere)."""
    if not list(run_folder.glob("*.wandb")):
        return []  # wandb made the folder, then the start was gone before wandb-core opened its log
    result = run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_folder)], timeout=120,
                 env={"WANDB_MODE": "offline", "WANDB_ERROR_REPORTING": "false"})
    assert result.returncode == 0, result.stderr[-2000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def wandb_folders(wandb_dir: Path) -> list[Path]:
    """The offline run folders in `wandb_dir`, oldest first (wandb names them offline-run-<time>-<id>,
    with -1, -2, ... when two start in the same second)."""
    def made(folder: Path) -> tuple[str, int]:
        parts = folder.name.split("-")
        return parts[2], int(parts[4]) if len(parts) > 4 else 0

    return sorted(wandb_dir.glob("offline-run-*"), key=made)


def wandb_runs(wandb_dir: Path) -> list[list[dict]]:
    """`wandb_records` of each offline run folder in `wandb_dir`, oldest first."""
    return [wandb_records(folder) for folder in wandb_folders(wandb_dir)]


def losses(run_dir: Path) -> dict[int, float]:
    """Loss per step from metrics/train.jsonl; a step redone after a crash keeps its last value."""
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics" / "train.jsonl")}


def checkpoint(run_dir: Path, name: str = "latest.pt") -> TrainState:
    """The checkpoint file, unverified; a sharded one's weights read whole from its folder."""
    return read_verified(run_dir / "checkpoints", str(run_dir / "checkpoints" / name))[0]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ in {different[:5]}"


def assert_same_run(run_dir: Path, baseline: Path) -> None:
    """The run's loss at every step and its final weights are bitwise the uninterrupted baseline's."""
    assert losses(run_dir) == losses(baseline)
    assert_same_weights(checkpoint(run_dir).model, checkpoint(baseline).model)


def isolation_prefix() -> list[str] | None:
    """`unshare` arguments giving a command a private mount namespace (for its own /dev/shm), or None."""
    candidates = [["unshare", "--mount", "--propagation", "private"]]
    candidates.append(["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"])
    if os.geteuid() != 0:
        candidates.reverse()
    for prefix in candidates:
        try:
            probe = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs tmpfs /dev/shm"],
                                   capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix
    return None
