"""Signals in, one agreed decision to stop out.

SIGTERM and SIGINT only set a flag while training runs; at each step boundary the ranks agree
(`distributed.any_true`) so all of them stop after the same step and write one final checkpoint.
Before training starts there is nothing to save, so a signal then unwinds at once (`Preempted`).
A second SIGINT exits immediately, as a user at a terminal expects.
"""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from typing import Iterator

EXIT_PREEMPTED = 143  # 128 + SIGTERM: "stopped by a signal, final checkpoint written"


class Preempted(BaseException):
    """Raised by the handler outside the training loop; BaseException so no `except Exception` eats it."""


class Preemption:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._deferred = False
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, _frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            os._exit(128 + signal.SIGINT)  # second Ctrl-C: the user wants out now
        self.signum = signum
        if not self._deferred:
            raise Preempted(signal.Signals(signum).name)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """While inside, a signal only sets the flag; the loop polls it at step boundaries."""
        self._deferred = True
        try:
            yield
        finally:
            self._deferred = False

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
