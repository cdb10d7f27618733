"""What happens at a step boundary: commit the write in flight? save, or skip? fatal if it fails?

A pure function of what every rank knows after the step's one all-reduce (a stop was asked for,
the time interval is due, some rank is still writing) and of the checkpointer's own state, so
every rank decides alike and the rules are unit-tested without processes. The trainer carries
the decision out; the checkpointer knows how.

The rules:
- A write in flight is committed once no rank is still writing, or at once (waiting for it) when
  the run stops or finishes, or the step is one the history keeps: those saves must not overtake it.
- A save is due when the step is not yet committed and a stop, the end, the step interval, the
  time interval or an owed save (one skipped earlier) asks for one.
- At most one write is in flight, and the loop never waits for a periodic one: a periodic save due
  while a write is in flight is skipped, and owed: the first boundary after that write's commit saves.
  A skipped save changes nothing on disk: the resume point stays the last committed step. The final
  save and a kept step's (`checkpoint.keep_every_steps`) are never skipped.
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
    owed: bool = False
    """A save was skipped since the last one started: save at the first boundary without a write in flight."""
    kept: bool = False
    """The history keeps this step (`checkpoint.keep_every_steps`): its save is never skipped."""

    @property
    def finished(self) -> bool:
        return self.step >= self.max_steps

    def commit(self) -> bool:
        """Commit the write in flight now (a collective: every rank decides the same)."""
        return self.in_flight is not None and (not self.writing or self.stop or self.finished or self.kept)

    def due(self) -> bool:
        unsaved = self.step > 0 and self.step != self.committed
        return unsaved and (self.stop or self.finished or self.time_due or self.steps_due or self.owed or self.kept)

    def skip(self) -> bool:
        """A periodic save is due while a write is in flight: skip it (ask after carrying out `commit`, which
        already committed the write in flight at a stop, the end or a kept step: those are never skipped)."""
        return self.due() and self.in_flight is not None and not (self.stop or self.finished or self.kept)

    def save(self) -> Save | None:
        """The save to make at this boundary, if any (ask after carrying out `commit`)."""
        if not self.due() or self.skip():
            return None
        assert self.in_flight is None, "carry out commit() first"
        final = self.stop or self.finished
        return Save(final=final, background=self.asynchronous and not final)

    def outcome(self) -> str:
        """`stop` (exit 143 once the final save is written), `finish` (exit 0) or `train` (one more step)."""
        return "stop" if self.stop else "finish" if self.finished else "train"
