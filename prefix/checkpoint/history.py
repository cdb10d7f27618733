"""Checkpoint history (`checkpoint.keep_every_steps: N`): every N-th step kept as `checkpoints/step-<N>/`.

A committed checkpoint file is never rewritten: a commit renames it (`latest*` → `prev*`) and rotation
unlinks it. So keeping a step is one hard link per file: no byte is copied and no space is used until
rotation drops the `latest*`/`prev*` names (a copy, fsynced, where the file system has no hard links).
The folder holds the save's files under their `latest` names (`latest.pt`, `latest_rank{r}.pt`, its
`sharded-<step>-<token>/`) and the manifest that lists them, so it is verified exactly as a resume
verifies `latest` (`resume.verify_save`), and is a checkpoints folder of its own.

Keeping is collective, right after the commit: every rank links the files it wrote into
`step-<N>.e<epoch>.tmp/`; rank 0 gathers the outcomes, links the manifest last, fsyncs and renames the
folder into place. A crash leaves only the temporary folder (`clean`, at the next start), never a
`step-<N>/` that looks complete. Rotation looks only at the top of `checkpoints/`, never into `step-*/`.
History is for evaluation later, not a resume point: a start resumes from `latest*`/`prev*` only.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import structlog

from prefix import distributed
from prefix.checkpoint import files
from prefix.checkpoint.files import FileSum
from prefix.checkpoint.resume import verify_save
from prefix.distributed import World
from prefix.errors import UserError

FOLDER = re.compile(r"^step-(\d+)$")


def name(step: int) -> str:
    return f"step-{step}"


def due(keep_every_steps: int, step: int) -> bool:
    """`step` is one to keep (and so to save, whatever the other intervals say)."""
    return bool(keep_every_steps) and step > 0 and step % keep_every_steps == 0


def kept(root: Path) -> list[int]:
    """The steps `root` (a run's checkpoints/) keeps, in order."""
    found = (FOLDER.match(p.name) for p in root.glob("step-*") if p.is_dir()) if root.is_dir() else ()
    return sorted(int(m.group(1)) for m in found if m)


def _place(source: Path, target: Path) -> None:
    """A second name for `source` at `target`; a durable copy where hard links fail."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
        with open(target, "rb+") as f:
            os.fsync(f.fileno())


def keep(root: Path, world: World, epoch: int, step: int, mine: dict[str, FileSum], manifest: Path | None,
         guard: Callable[[], None]) -> None:
    """Collective, once every rank committed `step`: keep its files as `root/step-<step>/`.

    `mine`: the files this rank wrote for the save, by manifest role; `manifest`: rank 0's, of the save.
    A failure (a full disk where files must be copied) is logged and leaves no folder: training goes on.
    """
    staging = files.tmp(root / name(step), epoch)
    error = None
    try:
        guard()
        for role in mine:
            _place(root / files.latest_file(role), staging / files.latest_file(role))
    except OSError as e:
        error = str(e)
    outcomes = distributed.gather(world, error)
    if not world.is_main:
        return
    errors = [f"rank {r}: {e}" for r, e in enumerate(outcomes) if e]
    if not errors:
        try:
            assert manifest is not None, "record() the save first"
            _publish(root, staging, step, manifest, epoch, guard)
        except OSError as e:
            errors.append(f"rank 0: {e}")
    log = structlog.get_logger()
    if errors:
        shutil.rmtree(staging, ignore_errors=True)
        log.warning("checkpoint not kept in history; training goes on", step=step, error="; ".join(errors))
    else:
        log.info("checkpoint kept", step=step, folder=f"checkpoints/{name(step)}")


def _publish(root: Path, staging: Path, step: int, manifest: Path, epoch: int, guard: Callable[[], None]) -> None:
    """Rank 0: the manifest last, every folder fsynced, then the rename that makes `step-<step>/` exist.

    A step kept before (redone after a resume that fell back) is replaced: this save is the run's."""
    _place(manifest, staging / manifest.name)
    for folder in [staging, *(p for p in staging.iterdir() if p.is_dir())]:
        files.fsync_dir(folder)
    guard()
    final, replaced = root / name(step), files.tmp(root / f"{name(step)}.old", epoch)
    if final.exists():
        os.replace(final, replaced)
    os.replace(staging, final)
    files.fsync_dir(root)
    shutil.rmtree(replaced, ignore_errors=True)


def clean(root: Path) -> None:
    """Temporary history folders a killed start left (rank 0, at start, before `*.tmp` files are removed)."""
    for path in root.glob("step-*.tmp"):
        shutil.rmtree(path, ignore_errors=True)


def verified(root: Path, step: int) -> Path:
    """The folder of kept step `step`, after every file of it verified; a UserError names a step that was not
    kept (listing those that were) or the first file that is not usable."""
    if not root.is_dir():
        raise UserError(f"{root.parent}: no such run (checkpoints/ missing); check the name and --runs-root")
    folder, steps = root / name(step), kept(root)
    others = ", ".join(str(s) for s in steps if s != step)
    if step not in steps:
        raise UserError(f"{root.parent}: step {step} was not kept (kept steps: {others or 'none'}); pass one of "
                        "those to --step (checkpoint.keep_every_steps: N keeps every N-th step), or leave --step "
                        "out to read the latest checkpoint")
    problems = verify_save(folder)
    if problems:
        raise UserError(f"{folder}: {problems[0].file}: {problems[0].reason}; restore the file, or pass another "
                        f"kept step ({others or 'none'}) or no --step (the latest checkpoint)")
    return folder
