"""Checkpoint copies in object storage (`checkpoint.remote`): the restore at start, and the start's uploader.

The remote epoch in every object name (remote_store.py) is the run lease's epoch plus a base kept in
`checkpoints/remote.json`, which a restore sets to the highest epoch found on the remote: it grows across
volumes too (a new volume's lease starts again at 1). Two starts never write the same object, and a fenced
start's late manifest is told apart as the lease's `ceilings` do on the volume (`usable`).

The restore (rank 0, before the usual choice, while the others wait): when the volume holds no usable
checkpoint, the newest complete remote step within those ceilings is downloaded into `checkpoints/.restore/`,
each file checked against its manifest, then renamed into the names a resume reads, after a fresh local
manifest; a missing or damaged object falls back to the next older step. `resume.choose` then verifies it
as usual. A remote that cannot be reached stops the start (exit 2): it may hold the run.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefix import distributed
from prefix.checkpoint import files
from prefix.checkpoint.checksums import NAMES, matches
from prefix.checkpoint.files import latest_file
from prefix.checkpoint.remote_store import MANIFEST, Copy, Missing, Store, catalog, missing, usable
from prefix.checkpoint.remote_upload import Uploads
from prefix.checkpoint.resume import Finding, NoUsableCheckpoint, Resume, choose
from prefix.errors import UserError
from prefix.runs.layout import write_atomically

if TYPE_CHECKING:
    from prefix.checkpoint.checkpointer import Checkpointer
    from prefix.config import CheckpointConfig
    from prefix.runs.lease import Lease

BASE = "remote.json"
"""In checkpoints/: the remote epoch base, {"epoch_base": N}, written by a restore."""
STAGING, RESTORING = ".upload", ".restore"
"""In checkpoints/: each rank's staged uploads, and the files of a restore before they are renamed."""


def patiently(call: Callable[[], Any], what: str, url: str, timeout_s: float, reset: Callable[[], None]) -> Any:
    """`call`, retried with backoff while the remote fails for another reason than a missing object; after
    `timeout_s` a UserError (a start must not begin a run afresh because its remote is away)."""
    began, delay = time.monotonic(), 0.5
    while True:
        try:
            return call()
        except Exception as e:
            if missing(e):
                raise Missing(str(e)) from None
            if time.monotonic() - began + delay > timeout_s:
                said = (str(e).splitlines() or [""])[0][:200]
                raise UserError(f"checkpoint.remote: cannot {what} {url} for {timeout_s:g} s ({type(e).__name__}: "
                                f"{said}); check the URL, S3_ENDPOINT_URL and the credentials and restart, or "
                                "unset checkpoint.remote to start without the remote's copies") from None
            reset()
            time.sleep(delay)
            delay = min(2 * delay, 5.0)


def fetch(store: Store, copy: Copy, into: Path, timeout_s: float) -> str | None:
    """Download every file of `copy` into `into`, each checked against the manifest; what is wrong, or None."""
    shutil.rmtree(into, ignore_errors=True)
    for role, expected in sorted(copy.files.items()):
        name = latest_file(role)
        try:
            patiently(partial(store.get, f"{copy.where.name}/{name}", into / name), "download from", store.url,
                      timeout_s, store.reset)
        except Missing:
            return f"{name} is missing"
        if not matches(into / name, expected):
            return f"{name} is damaged: its {NAMES[expected.algorithm]} does not match the manifest"
    return None


def publish(folder: Path, into: Path, copy: Copy, epoch: int) -> None:
    """Rename the fetched files into place: a manifest first (as a save does), shard folders, rank files,
    and latest.pt last."""
    files.write_manifest(folder, copy.step, copy.world_size, copy.files, epoch)
    names = sorted({latest_file(role).split("/")[0] for role in copy.files}, key=lambda n: n == "latest.pt")
    for name in names:
        if (folder / name).is_dir():
            shutil.rmtree(folder / name)  # an unusable local copy of the same save
        os.replace(into / name, folder / name)
    files.fsync_dir(folder)
    shutil.rmtree(into, ignore_errors=True)


def restore(store: Store, folder: Path, epoch: int, guard: Callable[[], None], timeout_s: float,
            log: Any) -> tuple[int | None, int]:
    """Rank 0: bring the newest usable remote step into `folder`; (its step or None, the remote's top epoch).

    None when the remote holds no complete step; a UserError when it cannot be listed within `timeout_s`,
    or when it holds steps and none of them is usable."""
    steps = catalog(patiently(store.names, "list", store.url, timeout_s, store.reset))
    top = max((s.epoch for s in steps), default=0)
    into = folder / RESTORING
    copies, problems = [], []
    for where in sorted(s for s, names in steps.items() if MANIFEST in names):
        try:
            patiently(partial(store.get, f"{where.name}/{MANIFEST}", into / MANIFEST), "download from", store.url,
                      timeout_s, store.reset)
            copies.append(Copy.loads((into / MANIFEST).read_text(), where))
        except (Missing, ValueError) as e:
            problem = f"{MANIFEST} is " + ("missing" if isinstance(e, Missing) else f"unusable ({e})")
            problems.append(f"{where.name}: {problem}")
            log.warning(f"checkpoint.remote: step {where.step} is unusable ({problem})", folder=where.name)
    ordered, fenced = usable(copies)
    for copy, why in fenced:
        log.info("checkpoint.remote: step skipped", step=copy.step, folder=copy.where.name, reason=why)
    for copy in ordered:
        problem = fetch(store, copy, into, timeout_s)
        if problem is None:
            guard()
            folder.mkdir(parents=True, exist_ok=True)
            publish(folder, into, copy, epoch)
            log.warning(f"resuming from remote {store.url} step {copy.step}", step=copy.step, folder=copy.where.name)
            return copy.step, top
        problems.append(f"{copy.where.name}: {problem}")
        log.warning(f"checkpoint.remote: step {copy.step} is unusable ({problem}); trying an older one",
                    step=copy.step, folder=copy.where.name)
    shutil.rmtree(into, ignore_errors=True)
    if problems:
        raise UserError(f"checkpoint.remote: no usable checkpoint in {store.url} ({'; '.join(problems)}); repair "
                        "the remote copies, or unset checkpoint.remote to start without them")
    log.info(f"checkpoint.remote: no checkpoint in {store.url} yet; starting from the beginning")
    return None, top


def epoch_base(folder: Path) -> int:
    try:
        return int(json.loads((folder / BASE).read_text())["epoch_base"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


class Remote:
    """`checkpoint.remote` for one start: a restore when the volume holds nothing usable, then the uploads."""

    def __init__(self, checkpointer: Checkpointer, cfg: CheckpointConfig, run_name: str, lease: Lease, log: Any):
        self.checkpointer, self.cfg, self.lease, self.log = checkpointer, cfg, lease, log
        self.folder, self.world = checkpointer.folder, checkpointer.world
        self.url = f"{(cfg.remote or '').rstrip('/')}/{run_name}"
        self.uploads: Uploads | None = None

    def find(self, ceilings: dict[int, int]) -> tuple[Resume | None, list[Finding]]:
        """`Checkpointer.find`, restoring from the remote first when nothing on the volume is usable; then every
        rank starts its uploader."""
        import structlog

        choice, findings, base = distributed.on_main(self.world, partial(self._choose, ceilings))
        epoch, rank = base + self.lease.epoch, self.world.rank
        log = structlog.get_logger(rank=rank)  # lazy: the run's log file once the run directory exists
        self.uploads = Uploads(Store(self.url, self.folder / STAGING / f"e{epoch}-rank{rank}"), self.folder,
                               self.world, epoch, choice.step if choice else 0, self.lease.check,
                               getattr(self.cfg, "keep_every_steps", 0), self.cfg.remote_timeout_s, log)
        self.checkpointer.uploads = self.uploads
        return choice, findings

    def _choose(self, ceilings: dict[int, int]) -> tuple[Resume | None, list[Finding], int]:
        """Rank 0: the usual choice, after a restore when it finds nothing usable; and the remote epoch base."""
        folder, look = self.folder, partial(choose, self.folder, self.world.world_size, ceilings)
        unusable = None
        try:
            choice, findings = look()
        except NoUsableCheckpoint as e:
            choice, findings, unusable = None, [], e
            self.log.warning("checkpoint.remote: no usable checkpoint on the volume; looking on the remote",
                             reason=str(e))
        base = epoch_base(folder)
        if choice is None:
            step, top = restore(Store(self.url, folder / RESTORING), folder, self.lease.epoch, self.lease.check,
                                self.cfg.remote_timeout_s, self.log)
            if top > base or step is not None:
                self.lease.check()
                self.lease.wrote = True
                base = max(base, top)
                folder.mkdir(parents=True, exist_ok=True)
                write_atomically(folder / BASE, json.dumps({"epoch_base": base}))
            if step is not None:
                choice, findings = look()
            elif unusable is not None:
                raise unusable
        for old in (folder / STAGING).glob("*") if (folder / STAGING).is_dir() else ():
            if not old.name.startswith(f"e{base + self.lease.epoch}-"):  # an earlier start's leftovers
                shutil.rmtree(old, ignore_errors=True)
        return choice, findings, base

    def close(self, exit_code: int) -> None:
        """Flush the last upload (bounded unless the run finished) and stop the uploader."""
        if self.uploads is not None:
            self.uploads.close(exit_code)
