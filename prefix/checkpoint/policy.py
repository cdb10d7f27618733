"""What happens at a step boundary: commit the write in flight? save? wait first? fatal if it fails?

A pure function of what every rank knows after the step's one all-reduce (a stop was asked for,
the time interval is due, some rank is still writing) and of the checkpointer's own state, so
every rank decides alike and the rules are unit-tested without processes. The trainer carries
the decision out; the checkpointer knows how.

The rules:
- A write in flight is committed once no rank is still writing, or at once (waiting for it) when
  the run stops or finishes: the final save must not overtake it.
- A save is due when the step is not yet committed and a stop, the end, the step interval or the
  time interval asks for one. At most one write is in flight: a save due while one is, waits for it.
- The final save (stop or end) is synchronous, and its failure ends the run (exit 2: the restart
  resumes from the last good checkpoint); a periodic save runs in the background when
  `checkpoint.async` is on, and its failure is retried at the next interval.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Save:
    final: bool
    """Synchronous, and fatal if it fails."""
    background: bool
    """Written by the writer thread from a snapshot; committed at a later boundary."""
    wait_first: bool
    """A write is still in flight: commit it (waiting for it) before this save starts."""


@dataclass(frozen=True)
class Boundary:
    """The state at a step boundary. `stop`, `time_due` and `writing` are already agreed by all ranks."""

    step: int
    max_steps: int
    stop: bool
    time_due: bool
    writing: bool
    steps_due: bool
    in_flight: int | None
    """Step of the write in flight, if any."""
    committed: int | None
    """Last committed step."""
    asynchronous: bool = True

    @property
    def finished(self) -> bool:
        return self.step >= self.max_steps

    def commit(self) -> bool:
        """Commit the write in flight now (a collective: every rank decides the same)."""
        return self.in_flight is not None and (not self.writing or self.stop or self.finished)

    def save(self) -> Save | None:
        """The save to make at this boundary, if any (ask after carrying out `commit`)."""
        unsaved = self.step > 0 and self.step != self.committed
        if not unsaved or not (self.stop or self.finished or self.time_due or self.steps_due):
            return None
        final = self.stop or self.finished
        return Save(final=final, background=self.asynchronous and not final, wait_first=self.in_flight is not None)

    def outcome(self) -> str:
        """`stop` (exit 143 once the final save is written), `finish` (exit 0) or `train` (one more step)."""
        return "stop" if self.stop else "finish" if self.finished else "train"
