"""Processes of one start of a run: launched as a pod's PID 1 would be, and killed all at once.

Used by the chaos harness and the tests: a kill must reach every process a start spawned, or a
straggler could write into the run directory after the next start began.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

import psutil

from prefix.errors import UserError

CHECKOUT = Path(__file__).resolve().parents[2]
"""The source checkout this package runs from (a clone, or an editable install): configs/, k8s/, runai/."""


def train_cmd(nproc: int, run_name: str, runs_root: Path, config: Path, *overrides: str,
              launcher: bool = False) -> list[str]:
    """torchrun with `nproc` ranks (gloo on the CPU), or one plain `python -m prefix.train` when nproc is 0;
    with `launcher`, torchrun under `prefix launch` as the pods run it, whose exit code is the workers'.

    The one way the chaos harness, the tests and the benchmarks start training."""
    if launcher and not nproc:
        raise ValueError("`prefix launch` runs torchrun: give nproc > 0")
    runner = ["-m", "prefix.cli", "launch"] if launcher else ["-m", "torch.distributed.run"]
    torchrun = [sys.executable, *runner, "--standalone", f"--nproc-per-node={nproc}"]
    entry = ["-m", "prefix.train"] if nproc else [sys.executable, "-m", "prefix.train"]
    return [*(torchrun if nproc else []), *entry, "--config", str(config), "--run-name", run_name,
            "--runs-root", str(runs_root), *overrides]


def checkout_file(relative: str, option: str) -> Path:
    """A file of the checkout (a config, a manifest, the Run:ai script), found wherever the command runs."""
    path = CHECKOUT / relative
    if not path.is_file():
        raise UserError(f"{relative}: not found beside this installation of prefix ({CHECKOUT}); "
                        f"pass {option}")
    return path


def _gone(p: psutil.Process) -> bool:
    with suppress(psutil.Error):
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    return True


class ProcessTree:
    """Every process a launch has spawned so far. torchrun puts workers in sessions of their own and an
    orphan leaves the tree, so neither a process-group kill nor a tree walk at kill time reaches them all."""

    def __init__(self, pid: int):
        self.procs: dict[int, psutil.Process] = {}
        with suppress(psutil.Error):
            self.procs[pid] = psutil.Process(pid)
        self.refresh()

    def refresh(self) -> bool:
        """Add the descendants of every known live process (costs a few ms); True if there were new ones."""
        children: dict[int, list[psutil.Process]] = {}
        for p in psutil.process_iter(["ppid"]):
            children.setdefault(p.info["ppid"], []).append(p)
        todo, known = [pid for pid, p in self.procs.items() if not _gone(p)], len(self.procs)
        while todo:
            for child in children.get(todo.pop(), []):
                if child.pid not in self.procs:
                    self.procs[child.pid] = child
                    todo.append(child.pid)
        return len(self.procs) > known

    def stop(self) -> None:
        """SIGSTOP every process, new ones too until none appears: the start is frozen, as a partitioned or
        paused node is (its lease then lapses); `resume` wakes it."""
        stopped: set[int] = set()
        while len(stopped) < len(self.procs) or self.refresh():
            for p in [p for p in self.procs.values() if p.pid not in stopped]:
                with suppress(psutil.Error):
                    p.send_signal(signal.SIGSTOP)
                stopped.add(p.pid)

    def resume(self) -> None:
        for p in self.procs.values():
            with suppress(psutil.Error):
                p.send_signal(signal.SIGCONT)

    def kill(self, timeout: float = 30) -> None:
        """SIGSTOP the known processes at once, then new ones until none appears (a stopped process cannot
        fork), then SIGKILL all: one instant cut, as when a node dies. Returns once all are gone, so no
        write of theirs can land after the next start began. psutil refuses pids reused by others."""
        self.stop()
        for p in self.procs.values():
            with suppress(psutil.Error):
                p.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while not all(_gone(p) for p in self.procs.values()) and time.monotonic() < deadline:
            time.sleep(0.01)


class Tail:
    """The JSON lines another process appends to a file, from where it ended when the tail was made."""

    def __init__(self, path: Path, from_start: bool = False):
        self.path, self.rest, self.records = path, b"", []
        self.offset = 0 if from_start or not path.exists() else path.stat().st_size

    def read(self) -> list[dict]:
        """Every record so far; a line torn by a kill is skipped."""
        with suppress(FileNotFoundError), open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
            self.offset += len(data)
            *lines, self.rest = (self.rest + data).split(b"\n")
            for line in lines:
                with suppress(ValueError):
                    self.records.append(json.loads(line))
        return self.records


class Launch:
    """One start in a session of its own, as a pod's PID 1, and what it appends to the run directory.
    Leaving the `with` block kills whatever is left, so an interrupted harness leaves no process behind."""

    def __init__(self, cmd: list[str], run_dir: Path, env: dict[str, str] | None = None, log: Path | None = None):
        self.log, self.checkpoints = log or run_dir.parent / f"{run_dir.name}.log", run_dir / "checkpoints"
        self.train, self.evals = (Tail(run_dir / "metrics" / f"{s}.jsonl") for s in ("train", "eval"))
        self.events = Tail(run_dir / "logs" / "rank0.jsonl")
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.t0, self.tree = time.monotonic(), ProcessTree(self.proc.pid)

    def __enter__(self) -> Launch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def kill(self) -> None:
        self.tree.kill()
        self.proc.wait(30)

    def steps(self) -> list[int]:
        return [r["step"] for r in self.train.read()]

    def tmp_files(self) -> list[str]:
        return sorted(p.name for p in self.checkpoints.glob("*.tmp"))

    def wait_for(self, cond: Callable[[], object], timeout: float, every: float = 0.02) -> str:
        """Poll `cond` until it holds ("hit"), the launch exits ("exit") or `timeout` passes ("timeout")."""
        deadline, next_refresh = time.monotonic() + timeout, 0.0
        while not cond():
            if self.proc.poll() is not None:
                return "exit"
            if (now := time.monotonic()) >= deadline:
                return "timeout"
            if every >= 0.01 and now >= next_refresh:  # not while aiming a kill: a refresh takes ms
                self.tree.refresh()
                next_refresh = now + 0.5
            time.sleep(every)
        return "hit"
