"""Corpora as MDS shards: byte-level tokens packed into fixed windows of `seq_len + 1` ids.

The embedded default corpus is the `.py` files of the running interpreter's standard library:
text that exists wherever Python does, so a first run needs no download. It is built once per
content hash, under a file lock, into a temporary folder renamed into place, so several ranks
starting together build it once and a killed build never looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from filelock import FileLock

from prefix.errors import UserError

EOD = 256
"""End-of-document id, after the 256 byte ids."""
BYTE_VOCAB = 257
MANIFEST = "manifest.json"
FORMAT = 1
"""Bumped whenever the corpus layout changes, so old caches are not reused."""


def encode(text: bytes | str) -> np.ndarray:
    """Byte-level tokens of one document, ending with EOD."""
    data = text.encode() if isinstance(text, str) else text
    return np.append(np.frombuffer(data, dtype=np.uint8).astype(np.uint16), EOD).astype(np.uint16)


def decode(ids: Iterable[int]) -> str:
    """Text of byte-level ids; EOD becomes a blank line, broken UTF-8 a replacement character."""
    out = bytearray()
    for i in ids:
        out += b"\n\n" if i == EOD else bytes([i]) if 0 <= i < 256 else b""
    return out.decode("utf-8", errors="replace")


def stdlib_documents() -> list[tuple[str, bytes]]:
    """(relative path, content) of every standard-library `.py` file, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    paths = sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))
    return [(p.relative_to(root).as_posix(), p.read_bytes()) for p in paths]


def is_validation(name: str, val_fraction: float) -> bool:
    """Hold out documents by a hash of their name: stable whatever else is in the corpus."""
    bucket = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little") % 100_000
    return bucket < val_fraction * 100_000


def windows(docs: Iterable[bytes], seq_len: int) -> Iterator[np.ndarray]:
    """Pack documents end to end and cut the stream into windows of seq_len + 1 tokens."""
    size = seq_len + 1
    buf = np.empty(0, dtype=np.uint16)
    for doc in docs:
        buf = np.concatenate([buf, encode(doc)])
        full = len(buf) // size
        for i in range(full):
            yield buf[i * size:(i + 1) * size]
        buf = buf[full * size:]


def write_split(docs: Iterable[bytes], out: Path, seq_len: int, size_limit: int = 1 << 23) -> int:
    """Write one split as MDS shards with a `tokens` column; returns the number of samples."""
    from prefix.data.compat import MDSWriter

    count = 0
    columns = {"tokens": f"ndarray:uint16:{seq_len + 1}"}
    with MDSWriter(out=str(out), columns=columns, size_limit=size_limit) as writer:
        for window in windows(docs, seq_len):
            writer.write({"tokens": window})
            count += 1
    return count


def write_corpus(docs: list[tuple[str, bytes]], out: Path, seq_len: int, val_fraction: float,
                 source: str) -> dict:
    """Write train/ and val/ splits plus a manifest into `out` (which must not exist yet)."""
    train = [text for name, text in docs if not is_validation(name, val_fraction)]
    val = [text for name, text in docs if is_validation(name, val_fraction)]
    if not val or not train:
        raise UserError(f"{source}: {len(docs)} documents are too few to hold out a validation split; "
                        "add documents or change data.val_fraction")
    out.mkdir(parents=True)
    manifest = {
        "format": FORMAT, "source": source, "tokenizer": "bytes", "vocab_size": BYTE_VOCAB,
        "seq_len": seq_len, "documents": {"train": len(train), "val": len(val)},
        "samples": {"train": write_split(train, out / "train", seq_len),
                    "val": write_split(val, out / "val", seq_len)},
    }
    if min(manifest["samples"].values()) == 0:
        raise UserError(f"{source}: too little text for one window of {seq_len + 1} tokens per split; "
                        "lower model.seq_len or add text")
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def content_hash(docs: list[tuple[str, bytes]], *params: object) -> str:
    h = hashlib.sha256(repr((FORMAT, *params)).encode())
    for name, text in docs:
        h.update(name.encode() + b"\0" + hashlib.sha256(text).digest())
    return h.hexdigest()[:16]


def ensure_default_corpus(cache_dir: Path, seq_len: int, val_fraction: float) -> tuple[Path, bool]:
    """The folder of the default corpus for these settings, and whether this call built it."""
    docs = stdlib_documents()
    final = cache_dir / f"stdlib-{content_hash(docs, seq_len, val_fraction)}"
    if (final / MANIFEST).is_file():
        return final, False
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if (final / MANIFEST).is_file():  # another rank built it while we waited
            return final, False
        for stale in cache_dir.glob(f".{final.name}.tmp-*"):  # builds killed before their rename
            shutil.rmtree(stale, ignore_errors=True)
        tmp = cache_dir / f".{final.name}.tmp-{os.getpid()}"
        write_corpus(docs, tmp, seq_len, val_fraction, source="python standard library")
        if final.exists():  # a half-built leftover without a manifest
            shutil.rmtree(final)
        os.replace(tmp, final)
    return final, True


def default_cache_dir(configured: str | None) -> Path:
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("PREFIX_CACHE_DIR"):
        return Path(os.environ["PREFIX_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "prefix"
