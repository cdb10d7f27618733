"""Signals in, one agreed decision to stop out.

While the training loop runs (`armed`), SIGTERM and SIGINT only set a flag; at each step boundary
the ranks agree (`distributed.any_true`) so all of them stop after the same step and write one
final checkpoint. Outside the loop the signals keep their default action: before the first step
there is nothing to save, and a Python handler could not run anyway while the main thread is
blocked in a collective (rendezvous, barrier) waiting for a rank that already left. Dying there
leaves nothing that a restart cannot handle, as after a SIGKILL. A second SIGINT exits at once.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

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
