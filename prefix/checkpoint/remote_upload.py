"""Every committed checkpoint uploaded to `checkpoint.remote` in the background; the step loop never waits.

Staging (on the step loop, right after a commit): every rank hard-links the files it wrote for the step into
its own folder, `checkpoints/.upload/e<epoch>-rank<r>/step-<step:08d>-e<epoch>/`. No byte is copied, and the
next save's rotation (`latest*` renamed to `prev*`, later deleted) cannot change what is uploaded. Where the
file system has no hard links, the uploader copies the file instead and drops the step if it no longer
matches its checksum (the rotation got there first).

Uploading (one thread per rank): its files, then, on every rank but 0, a `done-rank<r>.json` marker. Rank 0
uploads its own files, waits for the others' markers (polling the listing; no collective on the step
loop), then uploads `manifest.json` last. At most one step is uploaded at a time and one waits: a newer
commit replaces the waiting step, never a backlog. A rank that skipped a step shows it with a marker in a
newer folder, and rank 0 stops waiting for that step.

Failures (a remote that is down, a timeout) are logged once as a warning and retried with backoff (up to a
minute); nothing is raised into training. At exit (`close`) the last step gets a bounded flush with no
retries: FLUSH_S after a signal (the pod has ~30 s), for as long as it progresses at the end of a finished
run; a thread still uploading is a daemon and is left behind.

Retention (rank 0, after each manifest): the two newest usable complete steps, and every complete step the
history keeps (`checkpoint.keep_every_steps`); other folders older than the newest are deleted, manifest
first, so a half-deleted folder is incomplete and never looks usable.

Zombies: the lease's fence (`guard`) runs before every upload and delete; the epoch in every object name
keeps two starts from ever writing the same object; a manifest a fenced start sent after all is passed over
by the ceilings (remote_store.py `usable`).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefix.checkpoint.checksums import FileSum, matches
from prefix.checkpoint.files import latest_file
from prefix.checkpoint.remote_store import (
    MANIFEST,
    Copy,
    Missing,
    Step,
    Store,
    catalog,
    done_marker,
    read_copy,
    usable,
)
from prefix.distributed import World

FLUSH_S = 10.0
"""At an exit other than a finished run: the longest the last upload may hold the process."""
MARKER_WAIT_S = 600.0
"""Rank 0 stops waiting for another rank's files of a step after this long (that rank is stuck)."""
BACKOFF_S = (1.0, 60.0)


class Superseded(Exception):
    """The step is dropped for a newer one."""


@dataclass
class Job:
    """One step's upload on this rank."""

    step: Step
    names: list[str]
    """This rank's files, staged, relative to the run's remote folder."""
    copies: dict[str, tuple[Path, FileSum]] = field(default_factory=dict)
    """Names to copy in the thread (no hard link was possible): the source and the checksum it must have."""
    manifest: Copy | None = None
    """Rank 0: uploaded last."""
    done: set[str] = field(default_factory=set)


class Uploads:
    """This rank's uploader: `committed` after each commit (step loop), `close` at exit."""

    def __init__(self, store: Store, checkpoints: Path, world: World, epoch: int, resumed_step: int,
                 guard: Callable[[], None], keep_every: int, timeout_s: float, log: Any):
        self.store, self.checkpoints, self.rank, self.epoch = store, checkpoints, world.rank, epoch
        self.resumed_step, self.guard, self.keep_every, self.timeout_s, self.log = \
            resumed_step, guard, keep_every, timeout_s, log
        self.uploaded: list[int] = []
        """Rank 0: the steps made complete on the remote by this start."""
        self.last: int | None = None  # the newest committed step
        self._cv = threading.Condition()
        self._pending: Job | None = None
        self._closing: float | None = None  # monotonic time of close()
        self._bound: float | None = None
        self._warned = self._failing = False
        self._known: dict[Step, Copy] = {}  # rank 0: the remote manifests read for retention
        self._thread: threading.Thread | None = None

    # -- the step loop's side -------------------------------------------------------------
    def committed(self, step: int, sums: dict[str, FileSum], manifest: Path | None) -> None:
        """`step` is committed on every rank: stage this rank's files of it (`sums`, by role; rank 0 also its
        manifest) and hand it to the thread, replacing a step still waiting."""
        self.last = step
        try:
            job = self._stage(Step(step, self.epoch), sums, manifest)
        except Exception as e:  # noqa: BLE001 (a manifest that does not parse, a full disk: never into training)
            self._warn(e, step)
            return
        with self._cv:
            if self._pending is not None:
                self._drop(self._pending)
            self._pending = job
            self._cv.notify_all()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="checkpoint-upload", daemon=True)
            self._thread.start()

    def _stage(self, where: Step, sums: dict[str, FileSum], manifest: Path | None) -> Job:
        folder = self.store.staging / where.name
        shutil.rmtree(folder, ignore_errors=True)
        job = Job(where, [])
        for role, checksum in sums.items():
            name = latest_file(role)
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(self.checkpoints / name, folder / name)
            except OSError:
                job.copies[f"{where.name}/{name}"] = (self.checkpoints / name, checksum)
            job.names.append(f"{where.name}/{name}")
        if manifest is not None:
            body = json.loads(manifest.read_text())
            job.manifest = Copy(where.step, where.epoch, int(body["world_size"]), self.resumed_step,
                                {role: FileSum.from_json(s) for role, s in body["files"].items()})
        return job

    def close(self, exit_code: int) -> None:
        """Flush the last step (no retries; bounded by FLUSH_S unless the run finished) and stop the thread."""
        with self._cv:
            self._closing = time.monotonic()
            self._bound = None if exit_code == 0 else FLUSH_S
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(self._bound)
        behind = self._thread is not None and self._thread.is_alive()
        if self.rank == 0 and self.last is not None and self.last not in self.uploaded:
            say = self.log.info if self._warned else self.log.warning
            say(f"checkpoint.remote: step {self.last} is not on the remote", step=self.last,
                newest_uploaded=self.uploaded[-1] if self.uploaded else None, still_uploading=behind or None)
        if not behind:
            shutil.rmtree(self.store.staging, ignore_errors=True)

    # -- the thread's side -----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while self._pending is None and self._closing is None:
                    self._cv.wait()
                job, self._pending = self._pending, None
            if job is None:
                return
            self._finish(job)
            self._drop(job)

    def _finish(self, job: Job) -> None:
        """Upload `job`, retrying with backoff until it is done or a newer step waits; at exit, one more try."""
        delay = BACKOFF_S[0]
        while True:
            after_close = self._closing is not None
            try:
                self._upload(job)
                if self._failing:
                    self._failing = False
                    self.log.info("checkpoint.remote: uploads work again", step=job.step.step)
                return
            except Superseded as e:
                self.log.info("checkpoint.remote: step not uploaded", step=job.step.step, reason=str(e))
                return
            except Exception as e:  # whatever the store raises: never into training
                self.store.reset()
                self._warn(e, job.step.step)
            with self._cv:
                if self._closing is None and self._pending is None:
                    self._cv.wait(delay)
                if self._pending is not None or after_close:
                    return
            delay = min(2 * delay, BACKOFF_S[1])

    def _warn(self, error: Exception, step: int) -> None:
        said = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"
        if not self._warned:
            self._warned = True
            self.log.warning("checkpoint.remote: upload failed; training goes on and the upload is retried in the "
                             "background", step=step, remote=self.store.url, error=said)
        else:
            self.log.debug("checkpoint.remote: upload failed again", step=step, error=said)
        self._failing = True

    def _upload(self, job: Job) -> None:
        for name in job.names:
            if name in job.done:
                continue
            self._check(job)
            if name in job.copies:
                self._copy(name, *job.copies[name])
            self.guard()
            self.store.put(name)
            job.done.add(name)
        if job.manifest is None:  # a rank but 0: say this rank's files are up
            marker = f"{job.step.name}/{done_marker(self.rank)}"
            (self.store.staging / marker).write_text(json.dumps({"step": job.step.step, "epoch": self.epoch}))
            self.guard()
            self.store.put(marker)
            return
        self._await_ranks(job)
        (self.store.staging / job.step.name / MANIFEST).write_text(job.manifest.dumps())
        self.guard()
        self.store.put(f"{job.step.name}/{MANIFEST}")
        self.uploaded.append(job.step.step)
        self._known[job.step] = job.manifest
        self.log.info("checkpoint uploaded", step=job.step.step, remote=f"{self.store.url}/{job.step.name}")
        try:
            self._retain()
        except Exception as e:  # tried again after the next upload
            self.log.debug("checkpoint.remote: retention failed", error=str(e))

    def _check(self, job: Job) -> None:
        """At exit, a newer step (the final one) goes first."""
        with self._cv:
            if self._closing is not None and self._pending is not None:
                raise Superseded(f"step {self._pending.step.step} was committed since")

    def _copy(self, name: str, source: Path, checksum: FileSum) -> None:
        shutil.copyfile(source, self.store.staging / name)
        if not matches(self.store.staging / name, checksum):
            raise Superseded(f"{source.name} was replaced before it could be copied (no hard links here)")

    def _await_ranks(self, job: Job) -> None:
        """Rank 0: until every other rank's marker of the step is up (bounded), or a rank skipped the step."""
        assert job.manifest is not None
        others, began, delay = set(range(1, job.manifest.world_size)), time.monotonic(), 0.2
        while others:
            steps = catalog(self.store.names())
            others -= {r for r in others if done_marker(r) in steps.get(job.step, ())}
            skipped = [r for r in others for s, names in steps.items()
                       if s.epoch == job.step.epoch and s.step > job.step.step and done_marker(r) in names]
            if skipped:
                raise Superseded(f"rank {skipped[0]} uploaded a newer step instead")
            with self._cv:
                limit = began + MARKER_WAIT_S if self._closing is None else \
                    self._closing + (self._bound if self._bound is not None else self.timeout_s)
                if others and time.monotonic() >= limit:
                    raise Superseded(f"ranks {sorted(others)} did not upload their files of it in time")
                self._check(job)
                if others:
                    self._cv.wait(delay)
            delay = min(1.5 * delay, 5.0)

    def _retain(self) -> None:
        """Rank 0: keep the two newest usable steps and the history's; delete older folders, manifest first."""
        steps = catalog(self.store.names())
        for where in [s for s, names in steps.items() if MANIFEST in names and s not in self._known]:
            try:
                self._known[where] = read_copy(self.store, where, self.store.staging / f"{where.name}.json")
            except (Missing, ValueError):
                continue  # not usable: deleted below once older than the newest
        ordered, _ = usable(c for s, c in self._known.items() if s in steps)
        if not ordered:
            return
        keep = {c.where for c in ordered[:2]} | {c.where for c in ordered if self.keep_every
                                                 and c.step % self.keep_every == 0}
        doomed = [s for s in steps if s not in keep and s < ordered[0].where]
        for where in doomed:
            names = sorted(steps[where], key=lambda n: n != MANIFEST)
            self.guard()
            self.store.delete([f"{where.name}/{n}" for n in names])
            self._known.pop(where, None)

    def _drop(self, job: Job) -> None:
        shutil.rmtree(self.store.staging / job.step.name, ignore_errors=True)
