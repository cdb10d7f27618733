"""The writer thread of asynchronous saves: one long-lived daemon thread, at the lowest CPU priority.

One thread for the whole run, started at the first asynchronous save: no thread start (nor its wait
for the scheduler) on the step loop at every save. A daemon, so that a write stuck on a lost peer never
holds the process at exit. Two things keep it from slowing the steps it overlaps (measured: a thread
saving the demo state over and over slowed the training thread to 0.41-0.50× at the same priority,
0.82× at nice 19, 0.93× with the shorter switch interval too; docs/checkpoints.md):
- on Linux it runs at nice 19 (threads there have their own nice value): where training keeps every
  core busy, the writer takes what is left, and the policy skips the saves that come due meanwhile
  (`policy.py`). Elsewhere the priority is left alone, since the call would lower the whole process;
- while it works, the interpreter's switch interval is 1 ms instead of 5: pickling the state holds the
  interpreter lock, and the training thread, back from a torch op, waits for it at most that long.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from prefix.checkpoint.checksums import FileSum

NICE = 19
"""The writer thread's nice value on Linux (0: the loop's own priority)."""
SWITCH_S = 0.001
"""The interpreter's switch interval while the writer works (Python's default: 5 ms)."""


def lower_priority(nice: int = NICE) -> None:
    """Give the calling thread (not the process) `nice`; threads it starts inherit it."""
    if nice and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):  # a container that forbids it: run as is
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


class Writer:
    """Runs submitted functions one at a time, in order, in one background thread."""

    def __init__(self, name: str = "checkpoint-write"):
        self.name = name
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable[[], Any]) -> Future:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        future: Future = Future()
        self._jobs.put((fn, future))
        return future

    def _run(self) -> None:
        lower_priority()
        while True:
            fn, future = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            usual = sys.getswitchinterval()
            sys.setswitchinterval(min(usual, SWITCH_S))
            try:
                future.set_result(fn())
            except BaseException as e:  # raised on the step loop's thread, where the result is asked for
                future.set_exception(e)
            finally:
                sys.setswitchinterval(usual)


@dataclass(frozen=True)
class Outcome:
    """Phases 1 and 2 of an asynchronous save, as the writer thread ends them."""

    sums: dict[str, FileSum] | None
    verdict: str | None
    """None: every rank wrote its files and rank 0 recorded them; else why the save failed."""
    write_s: float
    crash: BaseException | None = None
    """A bug, not the disk: every rank drops the save, and this one raises it on its step loop."""


@dataclass
class Flight:
    """The asynchronous save in flight, as the step loop follows it."""

    step: int
    outcome: Future
    written: threading.Event = field(default_factory=threading.Event)
    """This rank's files are written (or failed): what `Checkpointer.close` waits for."""
    stall_s: float = 0.0
    skipped: int = 0
