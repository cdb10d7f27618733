"""The checksums of checkpoint files (`checkpoint.checksum`), computed as the bytes go out or from a file.

- `xxh3` (default): the 128-bit XXH3 of the `xxhash` package (a dependency of mosaicml-streaming), ~10 GB/s
  per core, outside the interpreter lock for large buffers: a save every step costs the loop nearly nothing.
  It catches bit flips and truncations, the damage a disk or a copy does; it is no defence against a
  forger, and neither is SHA-256 next to a manifest anyone who can write the file can rewrite.
- `sha256`: ~1-2 GB/s per core (hashed in a second thread while the bytes are written).

A manifest names the algorithm of every file it lists (`{"xxh3": "…", "bytes": N}`); entries without one,
written before the choice existed, are SHA-256 (`{"sha256": "…", "bytes": N}`), so old checkpoints verify
unchanged, and a run may change `checkpoint.checksum` between starts.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

ALGORITHMS: dict[str, Callable[[], Any]] = {"xxh3": xxhash.xxh3_128, "sha256": hashlib.sha256}
DEFAULT = "xxh3"
NAMES = {"xxh3": "XXH3-128", "sha256": "SHA-256"}
"""How messages name each algorithm."""

def second_thread(algorithm: str) -> AbstractContextManager[ThreadPoolExecutor | None]:
    """A thread to hash in while the bytes are written (`HashingWriter`), for SHA-256; none for XXH3, faster
    inline than a hand-off."""
    return ThreadPoolExecutor(1, thread_name_prefix="checkpoint-hash") if algorithm == "sha256" else nullcontext()


@dataclass(frozen=True)
class FileSum:
    digest: str
    bytes: int
    algorithm: str = "sha256"

    def to_json(self) -> dict[str, Any]:
        return {self.algorithm: self.digest, "bytes": self.bytes}

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> FileSum:
        """A manifest's entry; KeyError when it names no known algorithm."""
        algorithm = next((a for a in ALGORITHMS if a in entry), None)
        if algorithm is None:
            raise KeyError(f"no checksum among {sorted(entry)}")
        return cls(str(entry[algorithm]), int(entry["bytes"]), algorithm)


def digest(data: bytes, algorithm: str = DEFAULT) -> str:
    return ALGORITHMS[algorithm](data).hexdigest()


def file_sum(path: Path, algorithm: str = DEFAULT) -> FileSum:
    with open(path, "rb") as f:
        found = hashlib.file_digest(f, ALGORITHMS[algorithm]).hexdigest()
        return FileSum(found, os.fstat(f.fileno()).st_size, algorithm)


def matches(path: Path, expected: FileSum) -> bool:
    """Whether the file at `path` has the checksum (in its algorithm) and size a manifest recorded."""
    return file_sum(path, expected.algorithm) == expected


class HashingWriter:
    """A write-only file object that hashes what passes through (torch.save only writes).

    With `hasher` (`second_thread`), a large chunk (a tensor's bytes) is hashed in that second
    thread while this one writes it: both release the interpreter lock, so the checksum costs no time where
    the disk is the bottleneck.
    """

    PARALLEL = 1 << 20

    def __init__(self, f, algorithm: str = DEFAULT, hasher: ThreadPoolExecutor | None = None):
        self.f, self.algorithm, self.hash, self.size = f, algorithm, ALGORITHMS[algorithm](), 0
        self.error: OSError | None = None
        self._hasher = hasher

    def write(self, data) -> int:
        self.size += len(data)
        hashed = None
        if self._hasher is not None and len(data) >= self.PARALLEL:
            hashed = self._hasher.submit(self.hash.update, data)
        else:
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

    def sum(self) -> FileSum:
        return FileSum(self.hash.hexdigest(), self.size, self.algorithm)
