"""Checkpoint files on disk: their names, durable checksummed writes, and the manifests.

A file is written under `<name>.tmp`, hashed (`checkpoint.checksum`, see `checksums`) as its bytes
go out, fsynced, and only then renamed into place by the commit. The checksums of one save are
recorded in a manifest, `manifest-<step>-<token>.json`, written by rank 0 once every rank has
written its files and before any of them is published; so every published file has its checksum
on disk already. The token keeps a redone save of the same step (after a crash) from overwriting
the manifest that an older file of that step is still checked against.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.serialization import config as serialization

from prefix.checkpoint.checksums import DEFAULT, FileSum, HashingWriter, matches, second_thread

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


def write_durably(obj: Any, path: Path, algorithm: str = DEFAULT) -> FileSum:
    """torch.save to `path`, fsynced; returns the checksum of the bytes written.

    Without the zip's CRC-32 of each record (~1 GB/s of CPU): torch.load does not check it, and the
    checksum covers every byte of the file. A full disk or an I/O error raises OSError (torch's zip
    writer would mask it as RuntimeError).
    """
    with open(path, "wb") as f, serialization.patch({"save.compute_crc32": False}), second_thread(algorithm) as hasher:
        out = HashingWriter(f, algorithm, hasher)
        try:
            torch.save(obj, out)
        except RuntimeError:
            if out.error is not None:
                raise out.error from None
            raise
        f.flush()
        os.fsync(f.fileno())
    return out.sum()


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


def remove_in_background(paths: list[Path], first: Callable[[], None] | None = None) -> None:
    """Unlink `paths` in a daemon thread (after `first`, when given); what a killed process leaves, the next
    start removes."""
    def work() -> None:
        if first is not None:
            first()
        for p in paths:
            p.unlink(missing_ok=True)

    if paths or first is not None:
        threading.Thread(target=work, name="checkpoint-cleanup", daemon=True).start()


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

    def verifies(self, role: str, path: Path) -> bool:
        """Whether the file at `path` is the one this manifest lists as `role` (hashed as it was recorded)."""
        expected = self.files.get(role)
        return expected is not None and matches(path, expected)


def write_manifest(folder: Path, step: int, world_size: int, files: dict[str, FileSum], epoch: int = 0) -> Path:
    """Durably write a new manifest; returns its path."""
    path = folder / f"manifest-{step}-{secrets.token_hex(4)}.json"
    body = {"format_version": FORMAT_VERSION, "step": step, "world_size": world_size, "epoch": epoch,
            "files": {role: s.to_json() for role, s in files.items()}}
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
            files = {role: FileSum.from_json(s) for role, s in body["files"].items()}
            manifests.append(Manifest(int(body["step"]), int(body["world_size"]), files, path.name,
                                      int(body.get("epoch", 0))))
        except (OSError, ValueError, KeyError, TypeError):
            unreadable.append(path.name)
    return manifests, unreadable


def stale_manifests(folder: Path, keep_steps: set[int]) -> list[Path]:
    """Manifests of steps no checkpoint file on disk can belong to any more (listed now: a save recording its
    manifest later, in the writer thread, must not be among them)."""
    return [path for path in folder.glob("manifest-*.json")
            if (m := MANIFEST.match(path.name)) and int(m.group(1)) not in keep_steps]
