"""Signals in, one agreed decision to stop out.

While the training loop runs (`armed`), SIGTERM and SIGINT only set a flag; at each step boundary
the ranks agree (`distributed.any_true`) so all of them stop after the same step and write one
final checkpoint. Outside the loop the signals keep their default action: before the first step
there is nothing to save, and a Python handler could not run anyway while the main thread is
blocked in a collective (rendezvous, barrier) waiting for a rank that already left. Dying there
leaves nothing that a restart cannot handle, as after a SIGKILL. A second SIGINT exits at once.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

from prefix.errors import record_exit

EXIT_PREEMPTED = 143  # 128 + SIGTERM: "stopped by a signal, final checkpoint written"
SIGNALS = (signal.SIGTERM, signal.SIGINT)


def default_actions() -> None:
    """Until training starts, a signal ends the process at once (Python's SIGINT raises instead)."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_DFL)


class Preemption:
    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, _frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            os._exit(128 + signal.SIGINT)  # second Ctrl-C: the user wants out now
        self.signum = signum

    @contextmanager
    def armed(self) -> Iterator[None]:
        """Inside, a signal only sets the flag; the loop polls it at step boundaries."""
        previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def exit_promptly(code: int) -> NoReturn:
    """Leave without the interpreter's module-by-module teardown.

    Called once every file is closed and the process group is gone. Py_FinalizeEx first joins the
    threads (running `threading`'s exit hooks: streaming's stop its prefetch threads there), then
    runs the atexit handlers (logging, multiprocessing, streaming's shared memory): both are done
    here the same way. What is skipped is the rest: garbage-collecting torch's, streaming's and
    transformers' modules one by one, 1-2 s of CPU that writes nothing, on the 30 s a preempted pod
    has (see docs/benchmarks.md).
    """
    record_exit(code)
    threading._shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
