"""Remove the shared memory and lock files that killed jobs of MosaicML streaming leave behind.

Every StreamingDataset claims a prefix number N and creates `/dev/shm/NNNNNN_<name>` segments and
`$TMPDIR/NNNNNN_{barrier,cache}_filelock` files. A clean exit unlinks the segments (never the lock
files); SIGKILL leaves both. Once the lock files are gone (a fresh /tmp), a stale `NNNNNN_locals`
naming the same local folder makes the next start with a remote fail ("Reused local directory");
stale segments hold memory, stale lock files push the numbers up.
streaming's `clean_stale_shared_memory()` stops at the first unused number and unlinks the
segments of live jobs too, so prefix decides by liveness instead: a number is in use while any
process on this host maps or holds open one of its files, and only numbers in use by none are
removed. This assumes every process sharing /dev/shm is visible in /proc (same PID namespace).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefix import distributed
from prefix.data.compat import streaming
from prefix.distributed import World

_names = streaming.base.constant
SHM_DIR = Path("/dev/shm")
SEGMENTS = tuple(_names.SHM_TO_CLEAN)
LOCKS = (_names.BARRIER_FILELOCK, _names.CACHE_FILELOCK)
# Removal order: streaming never claims a number while its `locals` segment or a lock file of it
# exists, so removing those last keeps a starting job off a number that is half removed.
REMOVAL_ORDER = (*(n for n in SEGMENTS if n != _names.LOCALS), _names.LOCALS, *LOCKS)
_FILE = re.compile(r"(\d{6,})_(\w+)")


def streaming_files(shm_dir: Path, lock_dir: Path) -> dict[int, list[Path]]:
    """streaming's segments and lock files by prefix number, each group in removal order."""
    found: dict[int, list[tuple[int, Path]]] = {}
    for folder, names in ((shm_dir, SEGMENTS), (lock_dir, LOCKS)):
        try:
            entries = os.listdir(folder)
        except FileNotFoundError:
            continue
        for entry in entries:
            match = _FILE.fullmatch(entry)
            if match and match[2] in names:
                found.setdefault(int(match[1]), []).append((REMOVAL_ORDER.index(match[2]), folder / entry))
    return {number: [path for _, path in sorted(files)] for number, files in found.items()}


def _used_paths(pid: str) -> Iterator[bytes]:
    """What one process maps (a segment stays mapped after its descriptor is closed) and holds open."""
    with open(f"/proc/{pid}/maps", "rb") as f:
        yield f.read()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            yield os.readlink(f"{fd_dir}/{fd}".encode())
        except FileNotFoundError:  # closed while we looked
            continue


def numbers_in_use(*folders: Path) -> set[int]:
    """Prefix numbers of files in `folders` that some process on this host maps or holds open."""
    dirs = b"|".join(re.escape(os.fsencode(os.path.realpath(d))) for d in folders)
    pattern = re.compile(rb"(?:" + dirs + rb")/(\d{6,})_")
    used: set[int] = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for text in _used_paths(pid):
                used.update(int(n) for n in pattern.findall(text))
        except (FileNotFoundError, ProcessLookupError):  # exited while we looked
            continue
        except PermissionError:  # another user's: it cannot open our 0600 files, nor we unlink its
            continue
    return used


def clean_stale_streaming_state(shm_dir: Path = SHM_DIR,
                                lock_dir: Path | None = None) -> dict[int, list[str]]:
    """Remove the files of every prefix number that no process uses; returns them by number.

    `lock_dir` defaults to streaming's own choice, `tempfile.gettempdir()`. Without /proc nothing
    can be proven unused, so nothing is removed.
    """
    lock_dir = Path(lock_dir or tempfile.gettempdir())
    groups = streaming_files(shm_dir, lock_dir)
    if not groups or not os.path.exists("/proc/self/maps"):
        return {}
    removed: dict[int, list[str]] = {}
    for number in sorted(groups.keys() - numbers_in_use(shm_dir, lock_dir)):
        for path in groups[number]:
            try:
                path.unlink()
            except (FileNotFoundError, PermissionError):  # gone meanwhile, or another user's
                continue
            removed.setdefault(number, []).append(str(path))
    return removed


def clean_node(world: World, log: Any) -> None:
    """Local rank 0 removes the leftovers of killed runs on this host; every rank waits.

    Collective, and called before any StreamingDataset of this job exists: streaming's prefix search
    on another rank would open stale segments, and an open segment counts as in use.
    """
    if world.local_rank == 0:
        removed = clean_stale_streaming_state()
        if removed:
            log.info("removed streaming leftovers of killed runs", prefixes=sorted(removed),
                     files=sum(map(len, removed.values())))
    distributed.barrier(world)
