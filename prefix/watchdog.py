"""Hang detection: a heartbeat file for probes, and a per-rank watchdog that ends a stuck process.

A stuck peer blocks the other ranks in a collective until the process group's timeout (if it fires),
and a hang outside collectives (a data worker, a dead file system) has none; neither says where it
was. Every rank runs a `Watchdog`: when no step finished for `timeout_s`, it dumps every thread's
stack to `logs/stacks_rank{r}_<unix time>.txt`, says so on stderr and exits EXIT_HUNG, so torchrun
tears the job down and the pod resumes from the last checkpoint. Rank 0 also writes
`logs/heartbeat.json` every step. No torch or other heavy import: `python -m prefix.watchdog` is a
cheap probe.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefix.errors import record_exit
from prefix.runs import write_atomically

EXIT_HUNG = 124  # as timeout(1): "no progress within the time limit"; stacks are in logs/
HEARTBEAT = "heartbeat.json"


def write_heartbeat(logs_dir: Path | str, step: int) -> None:
    """Atomically replace logs/heartbeat.json (a reader never sees half); no fsync: it only says "alive"."""
    write_atomically(Path(logs_dir) / HEARTBEAT,
                     json.dumps({"step": step, "time": time.time(), "pid": os.getpid(), "rank": 0}))


def _heartbeat_path(where: Any) -> Path:
    """A RunDir, a run directory or its logs/ folder → the heartbeat file."""
    path = Path(getattr(where, "logs", where))
    return path / HEARTBEAT if path.name == "logs" or (path / HEARTBEAT).is_file() else path / "logs" / HEARTBEAT


def read_heartbeat(run_dir_or_logs: Any) -> dict[str, Any] | None:
    """The last heartbeat ({"step", "time", "pid", "rank"}), or None when there is none (yet)."""
    try:
        beat = json.loads(_heartbeat_path(run_dir_or_logs).read_text())
    except (OSError, ValueError):
        return None
    return beat if isinstance(beat, dict) and isinstance(beat.get("time"), (int, float)) else None


def heartbeat_age(run_dir_or_logs: Any, now: float | None = None) -> float | None:
    """Seconds since rank 0 last finished a step (wall clock), or None without a heartbeat."""
    beat = read_heartbeat(run_dir_or_logs)
    return None if beat is None else (time.time() if now is None else now) - beat["time"]


class Watchdog:
    """Exits the process when `beat` was not called for `timeout_s` seconds after `start` (0: off).

    Progress is measured on this rank's monotonic clock, so each rank judges its own stall. A pause
    of the whole process (SIGSTOP, a frozen VM) is not counted: the checker thread notices that it
    was not scheduled and moves the deadline by the time it lost.
    """

    def __init__(self, timeout_s: float, logs_dir: Path, rank: int, log: Any):
        self.timeout_s, self.logs, self.rank, self.log = timeout_s, Path(logs_dir), rank, log
        self.step: int | None = None
        self._last = time.monotonic()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.before_write: Callable[[], None] | None = None
        """Called before each heartbeat write (the run lease's fence)."""
        self._heartbeat_warned = self._heartbeat_failing = False

    def start(self, step: int | None = None) -> None:
        """Arm the watchdog (before the first step, so a hang in it is caught); `step` also beats."""
        self._last = time.monotonic()
        if step is not None:
            self.beat(step)
        if self.timeout_s > 0 and self._thread is None and not self._stopped.is_set():
            self._thread = threading.Thread(target=self._watch, name="prefix-watchdog", daemon=True)
            self._thread.start()

    def beat(self, step: int) -> None:
        """A step finished: progress for the watchdog and, on rank 0, a new heartbeat file."""
        self.step, self._last = step, time.monotonic()
        if self.rank == 0:
            if self.before_write is not None:
                self.before_write()
            try:
                write_heartbeat(self.logs, step)
            except OSError as e:  # a probe may then restart us, but training must not stop for it
                if not self._heartbeat_warned:  # once per process: a nearly full volume may come and go
                    self._heartbeat_warned = True
                    self.log.warning("heartbeat not written; training goes on, retried every step",
                                     file=str(self.logs / HEARTBEAT), error=f"{type(e).__name__}: {e}")
                self._heartbeat_failing = True
            else:
                if self._heartbeat_failing:
                    self._heartbeat_failing = False
                    self.log.info("heartbeat written again", step=step)

    def stop(self) -> None:
        """After this returns the watchdog never fires (it may exit the process while this waits)."""
        with self._lock:
            self._stopped.set()

    def _watch(self) -> None:
        period = min(1.0, self.timeout_s / 10)
        tick = time.monotonic()
        while not self._stopped.wait(period):
            now = time.monotonic()
            if now - tick > 5 * period + 1:  # this thread was not running: the process was paused
                self._last += now - tick - period
            tick = now
            if now - self._last >= self.timeout_s:
                self._fire(now - self._last)

    def _fire(self, idle: float) -> None:
        with self._lock:
            if self._stopped.is_set():
                return
            try:
                stacks = self.logs / f"stacks_rank{self.rank}_{int(time.time())}.txt"
                try:
                    with open(stacks, "w") as f:
                        f.write(f"watchdog: rank {self.rank}, no progress for {idle:.0f}s after step {self.step}\n\n")
                        f.flush()
                        faulthandler.dump_traceback(f, all_threads=True)
                    where = str(stacks)
                except OSError as e:
                    faulthandler.dump_traceback(sys.stderr, all_threads=True)
                    where = f"stderr ({stacks} not written: {e.strerror})"
                self.log.error("watchdog: no progress; stacks dumped, exiting", timeout_s=self.timeout_s,
                               idle_s=round(idle, 1), step=self.step, stacks=where, exit_code=EXIT_HUNG)
                print(f"error: watchdog: rank {self.rank} finished no step for {idle:.0f}s (watchdog.timeout_s="
                      f"{self.timeout_s:g}) after step {self.step}; stacks of all threads in {where}; check the "
                      "stacks (a stuck collective or a dead peer); raise watchdog.timeout_s if steps, evaluation "
                      "or checkpoints are legitimately this slow", file=sys.stderr, flush=True)
            finally:
                record_exit(EXIT_HUNG)
                os._exit(EXIT_HUNG)


def pid1_started() -> float:
    """Unix time PID 1 started: in a pod that is `prefix launch` (exec), i.e. when this container started."""
    with open("/proc/stat") as f:
        boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    with open("/proc/1/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks after boot
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    """Liveness probe: exit 0 if rank 0 finished a step within --max-age seconds, else 1."""
    p = argparse.ArgumentParser(prog="python -m prefix.watchdog", description=main.__doc__)
    p.add_argument("run_dir", help="the run directory (or its logs/ folder)")
    p.add_argument("--max-age", type=float, required=True, help="seconds")
    p.add_argument("--this-container", action="store_true",
                   help="a heartbeat older than PID 1 (left by a previous pod) counts as none")
    args = p.parse_args(argv)
    beat = read_heartbeat(args.run_dir)
    if beat is not None and args.this_container and beat["time"] < pid1_started():
        beat = None
    age = None if beat is None else time.time() - beat["time"]
    if age is None or age > args.max_age:
        print(f"no heartbeat of this start in {_heartbeat_path(args.run_dir)}" if age is None else
              f"heartbeat is {age:.0f}s old (more than {args.max_age:g}s)", file=sys.stderr)
        return 1
    print(f"heartbeat {age:.1f}s old, step {beat['step']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
