"""Checkpoint files on disk: their names, durable checksummed writes, and the manifests.

A file is written under `<name>.tmp`, hashed (SHA-256) as its bytes go out, fsynced, and only
then renamed into place by the commit. The checksums of one save are recorded in a manifest,
`manifest-<step>-<token>.json`, written by rank 0 once every rank has written its files and
before any of them is published; so every published file has its checksum on disk already. The
token keeps a redone save of the same step (after a crash) from overwriting the manifest that an
older file of that step is still checked against.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 2
"""2: checksummed files with manifests. Files of format 1 are refused at resume."""
SLOTS = ("latest", "prev")
MANIFEST = re.compile(r"^manifest-(\d+)-([0-9a-f]+)\.json$")
SHARD_FOLDERS = "sharded-*"
"""trainer.parallelism=fsdp: the fresh folder of each save's sharded model and optimizer (checkpoint/sharded.py)."""


def shard_folder(step: int, token: str) -> str:
    return f"sharded-{step}-{token}"


def global_name(slot: str) -> str:
    return f"{slot}.pt"


def rank_name(slot: str, rank: int) -> str:
    return f"{slot}_rank{rank}.pt"


def latest_file(role: str) -> str:
    """The committed file of a manifest role: "global" → latest.pt, "rank<r>" → latest_rank<r>.pt; a shard's
    role is its path in the checkpoints folder already."""
    if role == "global":
        return global_name(SLOTS[0])
    if role.startswith("rank") and role[4:].isdigit():
        return rank_name(SLOTS[0], int(role[4:]))
    return role


def tmp(path: Path, epoch: int | None = None) -> Path:
    """The name a file is written under before its commit; with the lease epoch, unique to one start."""
    return path.with_name(path.name + ("" if epoch is None else f".e{epoch}") + ".tmp")


@dataclass(frozen=True)
class FileSum:
    sha256: str
    bytes: int


class _HashingWriter:
    """A write-only file object that hashes what passes through (torch.save only writes).

    A large chunk (a tensor's bytes) is hashed in a second thread while this one writes it: both
    release the GIL, so the checksum costs no time where the disk is the bottleneck.
    """

    PARALLEL = 1 << 20

    def __init__(self, f, hasher: ThreadPoolExecutor):
        self.f, self.hash, self.size, self._hasher = f, hashlib.sha256(), 0, hasher
        self.error: OSError | None = None

    def write(self, data) -> int:
        self.size += len(data)
        hashed = self._hasher.submit(self.hash.update, data) if len(data) >= self.PARALLEL else None
        if hashed is None:
            self.hash.update(data)
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise
        finally:
            if hashed is not None:
                hashed.result()  # torch may reuse `data` once this returns

    def flush(self) -> None:
        self.f.flush()


def write_durably(obj: Any, path: Path) -> FileSum:
    """torch.save to `path`, fsynced; returns the checksum of the bytes written.

    A full disk or an I/O error raises OSError (torch's zip writer would mask it as RuntimeError).
    """
    with open(path, "wb") as f, ThreadPoolExecutor(1, thread_name_prefix="checkpoint-hash") as hasher:
        out = _HashingWriter(f, hasher)
        try:
            torch.save(obj, out)
        except RuntimeError:
            if out.error is not None:
                raise out.error from None
            raise
        f.flush()
        os.fsync(f.fileno())
    return FileSum(out.hash.hexdigest(), out.size)


def file_sum(path: Path) -> FileSum:
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        return FileSum(digest, os.fstat(f.fileno()).st_size)


RETIRED = "retired-"
"""Prefix of the second names that keep a commit from freeing the files it replaces (see `second_names`)."""


def second_names(paths: Iterable[Path]) -> list[Path]:
    """Give each existing file a second name, `retired-<name>`, before a commit replaces it.

    The commit's renames then only drop a name; freeing a large file's blocks (ext4: ~0.3 s per GB)
    happens when the second name is removed, off the step loop (`remove_in_background`). A file
    system without hard links gets none: its commit frees the file itself, as before.
    """
    named = []
    for path in paths:
        second = path.with_name(RETIRED + path.name)
        try:
            second.unlink(missing_ok=True)
            os.link(path, second)
        except OSError:  # no such file yet, or no hard links here
            continue
        named.append(second)
    return named


def remove_in_background(paths: list[Path]) -> None:
    """Unlink `paths` in a daemon thread; what a killed process leaves, the next start removes."""
    if paths:
        threading.Thread(target=lambda: [p.unlink(missing_ok=True) for p in paths], name="checkpoint-cleanup",
                         daemon=True).start()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Manifest:
    """The checksums of one save: `files` maps "global" and "rank{r}" to their FileSum."""

    step: int
    world_size: int
    files: dict[str, FileSum]
    name: str = ""
    epoch: int = 0
    """The run lease's epoch the save was committed under (0: written before leases existed)."""

    def lists(self, role: str, checksum: FileSum) -> bool:
        return self.files.get(role) == checksum


def write_manifest(folder: Path, step: int, world_size: int, files: dict[str, FileSum], epoch: int = 0) -> Path:
    """Durably write a new manifest; returns its path."""
    path = folder / f"manifest-{step}-{secrets.token_hex(4)}.json"
    body = {"format_version": FORMAT_VERSION, "step": step, "world_size": world_size, "epoch": epoch,
            "files": {role: asdict(s) for role, s in files.items()}}
    with open(tmp(path), "w") as f:
        json.dump(body, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp(path), path)
    fsync_dir(folder)
    return path


def read_manifests(folder: Path) -> tuple[list[Manifest], list[str]]:
    """Every readable manifest in `folder`, and the names of those that are not."""
    manifests, unreadable = [], []
    for path in sorted(folder.glob("manifest-*.json")):
        if not MANIFEST.match(path.name):
            continue
        try:
            body = json.loads(path.read_text())
            files = {role: FileSum(s["sha256"], int(s["bytes"])) for role, s in body["files"].items()}
            manifests.append(Manifest(int(body["step"]), int(body["world_size"]), files, path.name,
                                      int(body.get("epoch", 0))))
        except (OSError, ValueError, KeyError, TypeError):
            unreadable.append(path.name)
    return manifests, unreadable


def prune_manifests(folder: Path, keep_steps: set[int]) -> None:
    """Remove manifests of steps no checkpoint file on disk can belong to any more."""
    for path in folder.glob("manifest-*.json"):
        m = MANIFEST.match(path.name)
        if m and int(m.group(1)) not in keep_steps:
            path.unlink(missing_ok=True)
