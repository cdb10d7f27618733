"""Saving is collective and crash-safe at every instant; resume is the newest verified step.

A save has three phases:
1. write: every rank writes its files under temporary names, checksummed and fsynced; a full disk
   or an I/O error here is caught and the ranks agree (rank 0 gathers the outcomes);
2. record: rank 0 writes the manifest with every file's checksum; the ranks learn the verdict;
3. commit: every rank moves the file of its last committed step to `prev*` (or drops an orphan,
   see `_publish`), renames the temporary file to `latest*` and fsyncs the folder; a barrier.
A failed save removes its temporary files and changes nothing else: the last committed step stays
where it was, and the trainer decides whether to go on (periodic save) or give up (final save).

Asynchronous saves (`start`, then `finish`) run phases 1 and 2 in the writer thread (`background`) on a
snapshot of the state (see `snapshot`: the thread makes the copy too, while the next forward and
backward run; the loop calls `before_update` before its optimizer step), while training goes on.
Phase 2's collectives run on a gloo group of the writer's own, so they never interleave with the
loop's. Phase 3 renames what every rank's loop must agree on, so it stays on the step loop's thread,
which calls `finish` once no rank is still `busy`. At most one write is in flight (the policy skips
the saves due meanwhile). A crash while a write is in flight leaves only temporary files and perhaps
its manifest: the previous step stays the resume point.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from prefix import distributed
from prefix.checkpoint import files, history
from prefix.checkpoint.background import Flight, Outcome, Writer
from prefix.checkpoint.files import FORMAT_VERSION, FileSum, global_name, rank_name, tmp
from prefix.checkpoint.resume import Finding, Resume, choose
from prefix.checkpoint.snapshot import Snapshot
from prefix.config import CheckpointConfig
from prefix.distributed import World


@dataclass(frozen=True)
class SaveResult:
    step: int
    stall_s: float
    """Seconds the step loop was blocked by this save (snapshot, waits, record and commit)."""
    write_s: float
    """Seconds this rank's files took to write (in the background when asynchronous)."""
    bytes: int
    """Bytes of this rank's files."""
    background: bool
    error: str | None = None
    """Why the save failed on some rank ("rank 1: No space left on device"); None if committed."""
    skipped: int = 0
    """Saves that came due while this one was being written, and were skipped."""


def _size(sums: dict[str, FileSum] | None) -> int:
    return sum(s.bytes for s in (sums or {}).values())


def _describe(error: OSError) -> str:
    return f"{error.strerror or error}" + (f" ({Path(error.filename).name})" if error.filename else "")


class Checkpointer:
    """Saves and restores the run's checkpoints; the trainer hands it plain state dicts."""

    def __init__(self, folder: Path, world: World, cfg: CheckpointConfig, sharded_saves: bool = False,
                 epoch: int = 0):
        """`epoch`: the run lease's (prefix/runs/lease.py), recorded in every manifest and in temporary
        names, so that a fenced start's leftovers never share a name with the live start's files."""
        self.folder = folder
        self.world = world
        self.cfg = cfg
        self.epoch = epoch
        self.guard: Callable[[], None] = lambda: None
        """Called before every write that matters (the lease's fence: exits if another start took over)."""
        self.uploads: Any = None
        """`checkpoint.remote`'s uploader (remote_upload.py): each committed step goes to it (a background upload)."""
        self.committed_step: int | None = None
        self._slot_global: str | None = None  # where the committed step's files live
        self._slot_rank: str | None = None
        self._previous_step: int | None = None  # committed before committed_step: prev*'s step
        self._manifest: Path | None = None  # written by the save in progress
        self._last_save_time = time.monotonic()
        self.every_seconds = float(cfg.every_seconds) if cfg.every_seconds != "auto" else 0.0
        """The time-based interval in force (`checkpoint.every_seconds`, or the automatic choice)."""
        self._snapshot = Snapshot()
        self._flight: Flight | None = None  # the asynchronous save in flight
        self._writer = Writer()
        self.owed = False
        """A save was skipped since the last one started: the policy saves at the next boundary it can."""
        self._retired: list[Path] = []  # second names of the files the save in progress replaces
        self._shards: str | None = None  # the sharded folder the save in progress writes
        # The writer thread's collectives (phase 2; DCP's in a sharded save) run while the step loop runs its
        # own: on a gloo group of their own, or the two would interleave on one group (a collective mismatch).
        # Made at the first asynchronous save (every rank starts it at the same boundary), or here for DCP.
        self._group = None
        if sharded_saves:
            self._writer_group()

    # -- resume -------------------------------------------------------------------------
    def find(self, ceilings: dict[int, int] | None = None) -> tuple[Resume | None, list[Finding]]:
        """Rank 0 inspects the folder (read-only); every rank gets the same answer or error.
        `ceilings`: lease epoch → last step its checkpoints may have (see `choose`)."""
        return distributed.on_main(self.world, lambda: choose(self.folder, self.world.world_size, ceilings))

    def load(self, choice: Resume) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The global state and this rank's state (None when this rank did not exist then)."""
        state = torch.load(self.folder / global_name(choice.global_slot), map_location="cpu",
                           weights_only=True)
        mine = choice.rank_slots.get(self.world.rank)
        rank_state = None if mine is None else torch.load(
            self.folder / rank_name(mine, self.world.rank), map_location="cpu", weights_only=True)
        self.committed_step = choice.step
        self._slot_global = choice.global_slot
        self._slot_rank = mine
        return state, rank_state

    def read_shards(self, name: str, state: dict[str, Any]) -> None:
        """Collective: fill `state` (the sharded model and optimizer) from the checkpoint's folder `name`."""
        from prefix.checkpoint import sharded  # here and below: DCP's import is for sharded runs only

        sharded.read(self.folder / name, state)

    def resume_point(self) -> str:
        """What a restart would resume from now, for messages."""
        if self.committed_step is None:
            return "the beginning (no checkpoint was committed)"
        return f"step {self.committed_step} ({global_name(self._slot_global or 'latest')})"

    def clean_temporary(self) -> None:
        """Drop temporary files left by a write that was killed, and the second names a final save left
        (rank 0, before any save)."""
        if self.world.is_main and self.folder.is_dir():
            self.guard()
            history.clean(self.folder)  # before the loop below: its folders end in .tmp too
            for path in self.folder.glob("*.tmp"):
                path.unlink(missing_ok=True)
            files.remove_in_background(list(self.folder.glob(f"{files.RETIRED}*")))
            self._remove_unlisted()

    # -- save ---------------------------------------------------------------------------
    def seconds_due(self) -> bool:
        s = self.every_seconds
        return bool(s) and time.monotonic() - self._last_save_time >= s

    def steps_due(self, step: int) -> bool:
        every = self.cfg.every_steps
        return (bool(every) and step % every == 0) or self.keeps(step)

    def keeps(self, step: int) -> bool:
        """The history keeps this step (`checkpoint.keep_every_steps`): its save is never skipped."""
        return history.due(self.cfg.keep_every_steps, step)

    def save(self, step: int, global_state: Callable[[], dict[str, Any]], rank_state: dict[str, Any],
             final: bool = False, shards: Callable[[], dict[str, Any]] | None = None) -> SaveResult:
        """Collective and synchronous: write, record, commit. A disk error on any rank fails it on all.

        `final`: the process exits next; the files this save replaced are freed by the next start,
        not on the way out. `shards`: the sharded model and optimizer state, written with DCP."""
        start = time.monotonic()
        sums, error = None, None
        self._name_shards(step, shards)
        try:
            sums = self.write(step, global_state, rank_state, shards() if shards else None)
        except OSError as e:
            error = _describe(e)
        written = time.monotonic()
        self._last_save_time, self.owed = start, False
        verdict = self._agree(step, sums, error)
        self._settle(step, sums, verdict, final)
        return SaveResult(step, time.monotonic() - start, written - start, _size(sums), False, verdict)

    def start(self, step: int, global_state: Callable[[], dict[str, Any]], rank_state: dict[str, Any],
              shards: Callable[[], dict[str, Any]] | None = None) -> None:
        """Snapshot the state, then write and record it in the writer thread; `finish` commits it."""
        assert self._flight is None, "finish() the write in flight first"
        begin = time.monotonic()
        snapshot, group = self._snapshot, self._writer_group()
        self._name_shards(step, shards)
        copy = snapshot.take({"rank": rank_state, "global": global_state() if self.world.is_main else None,
                              "shards": shards() if shards else None})
        written = threading.Event()

        def phases() -> Outcome:
            """Phases 1 and 2 (in the writer thread)."""
            sums, error, crash, began = None, None, None, time.monotonic()
            try:
                snapshot.fill()
                sums = self.write(step, lambda: copy["global"], copy["rank"], copy["shards"])
            except OSError as e:
                error = _describe(e)
            except BaseException as e:  # a bug, not the disk: the others drop the save, this rank raises it
                crash, error = e, f"{type(e).__name__}: {e}"
            finally:
                written.set()
            return Outcome(sums, self._agree(step, sums, error, group), time.monotonic() - began, crash)

        self._last_save_time, self.owed = begin, False
        self._flight = Flight(step, self._writer.submit(phases), written)
        self._flight.stall_s = time.monotonic() - begin

    def skip(self) -> None:
        """A save came due while the write in flight is still running (the policy's choice): counted, and owed."""
        assert self._flight is not None, "a save is skipped only while a write is in flight"
        self._flight.skipped += 1
        self.owed = True

    def before_update(self) -> None:
        """The loop is about to update the state in place: the save in flight must have copied it first."""
        if self._flight is not None:
            self._flight.stall_s += self._snapshot.fence()

    @property
    def in_flight(self) -> int | None:
        """The step of the asynchronous save not yet finished, if any."""
        return None if self._flight is None else self._flight.step

    @property
    def busy(self) -> bool:
        """This rank's writer is still writing or recording the save in flight (the trainer all-reduces it)."""
        return self._flight is not None and not self._flight.outcome.done()

    def finish(self) -> SaveResult:
        """Collective: wait for this rank's writer to end phases 1 and 2, then commit on every rank."""
        flight, begin = self._flight, time.monotonic()
        assert flight is not None, "no save in flight"
        self._flight = None
        outcome: Outcome = flight.outcome.result()  # raises what failed phase 2 (a lost peer)
        self._settle(flight.step, outcome.sums, outcome.verdict)
        if outcome.crash is not None:
            raise outcome.crash
        return SaveResult(flight.step, flight.stall_s + time.monotonic() - begin, outcome.write_s,
                          _size(outcome.sums), True, outcome.verdict, flight.skipped)

    def close(self) -> None:
        """Leaving without finishing (an error): let this rank's write end, and remove what it wrote. Phase 2
        may still wait for a peer that is gone: the writer is a daemon thread, and nothing it records is
        committed."""
        if self._flight is not None:
            self._flight.written.wait()
            self._flight = None
            self.discard()

    def _writer_group(self) -> Any:
        """The gloo group of the writer thread's collectives (None with one process)."""
        import torch.distributed as dist

        if self._group is None and dist.is_initialized():
            self._group = dist.new_group(backend="gloo", timeout=distributed.timeout())
        return self._group

    def _agree(self, step: int, sums: dict[str, FileSum] | None, error: str | None, group: Any = None) -> str | None:
        """Phase 2 (collective on `group`): rank 0 gathers the outcomes and records the manifest; every rank
        gets the verdict (None: every file is written and listed in a durable manifest)."""
        outcomes = distributed.gather(self.world, (sums, error), group)
        verdict = None
        if self.world.is_main:
            errors = [f"rank {r}: {err}" for r, (_, err) in enumerate(outcomes) if err]
            if not errors:
                try:
                    self.record(step, [s for s, _ in outcomes])
                except OSError as e:
                    errors.append(f"rank 0: {_describe(e)}")
            verdict = "; ".join(errors) or None
        return distributed.broadcast(self.world, verdict, group)

    def _settle(self, step: int, sums: dict[str, FileSum] | None, verdict: str | None, final: bool = False) -> None:
        """Phase 3 (collective): every rank commits the save, or drops it if it failed anywhere.

        A periodic commit leaves the folder's fsync and the removal of old manifests to a background thread
        (the next manifest's fsync makes the commit durable at the latest: docs/checkpoints.md); a final save
        does both before it returns, and leaves the files it replaced to the next start."""
        tidy = None
        if verdict is None:
            self.commit(step, durable=final)
            distributed.barrier(self.world)  # the step is committed on every rank
            if history.due(self.cfg.keep_every_steps, step):  # collective: every rank decides alike
                history.keep(self.folder, self.world, self.epoch, step, sums or {}, self._manifest, self.guard)
            if self.uploads is not None:  # stages the step's files (hard links) for its background upload
                self.uploads.committed(step, sums or {}, self._manifest)
            stale = self.prune(step, now=final)
            tidy = None if final else partial(files.fsync_dir, self.folder)  # durable: see the docstring
        else:
            self.discard()
            stale = []
        files.remove_in_background([] if final else stale + self._retired, first=tidy)
        self._retired = []

    def _name_shards(self, step: int, shards: Callable[[], dict[str, Any]] | None) -> None:
        """Every rank's name for this save's fresh sharded folder (rank 0 draws the token)."""
        self._shards = None if shards is None else distributed.broadcast(
            self.world, files.shard_folder(step, secrets.token_hex(4)))

    def write(self, step: int, global_state: Callable[[], dict[str, Any]],
              rank_state: dict[str, Any], shards: dict[str, Any] | None = None) -> dict[str, FileSum]:
        """Phase 1: this rank's files under temporary names (and its shards in a fresh folder, collectively);
        their checksums by role."""
        self.guard()
        self.folder.mkdir(parents=True, exist_ok=True)
        r, stamp = self.world.rank, {"step": step, "format_version": FORMAT_VERSION}
        sums, folder = {}, {}
        if shards is not None:
            assert self._shards is not None, "_name_shards() first"
            from prefix.checkpoint import sharded

            folder = {"sharded": self._shards}  # named in the global file only
            sums = sharded.write(self.folder / self._shards, shards, r, self._group, self.cfg.checksum)
        published = [rank_name(slot, r) for slot in files.SLOTS] + (
            [global_name(slot) for slot in files.SLOTS] if self.world.is_main else [])
        self._retired = files.second_names(self.folder / name for name in published)
        mine = {**rank_state, **stamp, "rank": r}
        sums[f"rank{r}"] = files.write_durably(mine, self._tmp(rank_name("latest", r)), self.cfg.checksum)
        if self.world.is_main:
            shared = {**global_state(), **stamp, **folder, "world_size": self.world.world_size}
            sums["global"] = files.write_durably(shared, self._tmp(global_name("latest")), self.cfg.checksum)
        return sums

    def record(self, step: int, sums_by_rank: list[dict[str, FileSum]]) -> None:
        """Phase 2 (rank 0): the manifest of this save, durable before any file is published."""
        listed = {role: s for sums in sums_by_rank for role, s in sums.items()}
        self.guard()
        self._manifest = files.write_manifest(self.folder, step, len(sums_by_rank), listed, self.epoch)

    def commit(self, step: int, durable: bool = True) -> None:
        """Phase 3, once the manifest is durable: publish this rank's files (`durable`: and fsync the folder)."""
        r = self.world.rank
        self.guard()
        self._slot_rank = self._publish(rank_name("latest", r), rank_name("prev", r), self._slot_rank)
        if self.world.is_main:
            self._slot_global = self._publish(global_name("latest"), global_name("prev"), self._slot_global)
        if durable:
            files.fsync_dir(self.folder)
        self._previous_step, self.committed_step = self.committed_step, step

    def prune(self, step: int, now: bool = True) -> list[Path]:
        """After every rank committed `step` (rank 0): forget manifests no file can need, and the sharded folders
        only they listed. Returns those manifests unless `now` (then removed here): the caller removes them."""
        keep = {step} | ({self._previous_step} if self.cfg.keep_previous else set())
        keep.discard(None)
        stale = []
        if self.world.is_main:
            self.guard()
            stale = files.stale_manifests(self.folder, keep)
            self._remove_unlisted(keep)
            if now:
                for path in stale:
                    path.unlink(missing_ok=True)
        self._manifest = None
        self._shards = None
        return [] if now else stale

    def _remove_unlisted(self, keep: set[int] | None = None) -> None:
        """Rank 0: sharded folders that no manifest (of the steps in `keep`) lists, removed off the step loop."""
        if not any(self.folder.glob(files.SHARD_FOLDERS)):
            return
        from prefix.checkpoint import sharded

        manifests, _ = files.read_manifests(self.folder)
        gone = sharded.unlisted(self.folder, [m.files for m in manifests if keep is None or m.step in keep])
        if gone:
            threading.Thread(target=sharded.remove, args=(gone,), name="checkpoint-cleanup", daemon=True).start()

    def discard(self) -> None:
        """A failed save: remove what it wrote, so the space is free and nothing refers to it."""
        mine = [self._tmp(rank_name("latest", self.world.rank))]
        if self.world.is_main:
            mine += [self._tmp(global_name("latest")), *self.folder.glob("manifest-*.json.tmp")]
        for path in mine:
            path.unlink(missing_ok=True)
        if self._manifest is not None:
            self._manifest.unlink(missing_ok=True)
            self._manifest = None
        if self._shards is not None and self.world.is_main:
            from prefix.checkpoint import sharded

            sharded.remove([self.folder / self._shards])
        self._shards = None

    def _tmp(self, name: str) -> Path:
        return tmp(self.folder / name, self.epoch)

    def _publish(self, latest: str, prev: str, committed_slot: str | None) -> str:
        """Rename `latest.tmp` to `latest`, keeping the last committed file as `prev`."""
        latest_path, prev_path = self.folder / latest, self.folder / prev
        if committed_slot == "latest":
            if self.cfg.keep_previous:
                os.replace(latest_path, prev_path)
        elif committed_slot == "prev" and latest_path.exists():
            latest_path.unlink()  # unusable, or a newer step that never completed on every rank
        os.replace(self._tmp(latest), latest_path)
        if not self.cfg.keep_previous and committed_slot is not None:
            prev_path.unlink(missing_ok=True)
        return "latest"
