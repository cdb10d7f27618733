"""MDS datasets written in the tests with streaming's own MDSWriter, the way other tools write them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from prefix.data.compat import MDSWriter


def rows(count: int, width: int, vocab: int = 257, seed: int = 0) -> list[np.ndarray]:
    """`count` samples of `width` random token ids below `vocab`."""
    rng = np.random.default_rng(seed)
    return list(rng.integers(0, vocab, size=(count, width), dtype=np.int64))


def write_split(folder: Path, samples: list[np.ndarray], encoding: str = "ndarray:uint16",
                size_limit: int = 1 << 16) -> None:
    """One split. encoding: `bytes` (little-endian int64, as llm-foundry's converters write them)
    or an MDS ndarray encoding such as `ndarray:int32` or `ndarray:uint16:65`."""
    dtype = np.dtype("<i8") if encoding == "bytes" else np.dtype(encoding.split(":")[1])
    with MDSWriter(out=str(folder), columns={"tokens": encoding}, size_limit=size_limit,
                   hashes=["sha1", "xxh64"]) as writer:
        for sample in samples:
            values = sample.astype(dtype)
            writer.write({"tokens": values.tobytes() if encoding == "bytes" else values})


def dataset(root: Path, train: int, val: int = 16, width: int = 65, seed: int = 0, vocab: int = 257,
            manifest: bool = True, **split_args) -> Path:
    """train/ and val/ splits of random ids, and a manifest whose content_hash covers the shards."""
    write_split(root / "train", rows(train, width, vocab, seed), **split_args)
    write_split(root / "val", rows(val, width, vocab, seed + 1), **split_args)
    if manifest:
        digest = hashlib.sha256()
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            digest.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
        (root / "manifest.json").write_text(json.dumps(
            {"vocab_size": vocab, "tokenizer": {"kind": "bytes"}, "content_hash": digest.hexdigest()[:16]}))
    return root


def shards(folder: Path) -> list[Path]:
    return sorted(folder.rglob("shard.*.mds"))
