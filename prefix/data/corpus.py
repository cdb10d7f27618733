"""How a dataset is stored, and the embedded default corpus.

A dataset is a folder with `train/` and `val/` MDS splits whose `tokens` column holds windows of
`seq_len + 1` ids (documents packed end to end, each followed by end-of-document), and a
`manifest.json` written last. It is built in a temporary folder beside its final name and renamed
into place, so a killed build never looks finished. `prefix data prepare` (`prepare.py`) and the
default corpus below share these writers.

The default corpus is the `.py` files of the running interpreter's standard library: text that
exists wherever Python does, so a first run needs no download. It is built once per set of files (paths,
sizes, mtimes), under a file lock, so several ranks starting together build it once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from filelock import FileLock

from prefix.data.sources import BadRecords
from prefix.data.tokenizers import BYTES
from prefix.errors import UserError

EOD = BYTES.eod_id
"""End-of-document id of the byte tokenizer, after the 256 byte ids."""
BYTE_VOCAB = BYTES.vocab_size
FORMAT = 2
"""Bumped whenever the dataset layout or manifest changes (the default corpus's cache key includes it)."""
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
HASHES = ["sha1", "xxh64"]
"""Shard hashes recorded in the index, so streaming's `validate_hash` can check downloads."""
Writers = dict[str, "SplitWriter"]


def is_validation(identity: str, val_fraction: float) -> bool:
    """Hold out documents by a hash of their identity: stable whatever else is in the corpus."""
    return holdout_bucket(identity) < val_fraction * 100_000


def holdout_bucket(identity: str) -> int:
    """0 to 99,999: a document is held out when its bucket is below `val_fraction` x 100,000."""
    return int.from_bytes(hashlib.sha256(identity.encode()).digest()[:4], "little") % 100_000


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


class SplitWriter:
    """One split: ids appended in order, cut into windows of `seq_len + 1`, written as MDS shards."""

    def __init__(self, out: Path, seq_len: int, dtype: str, shard_size: int) -> None:
        from prefix.data.compat import MDSWriter

        self.width, self.dtype = seq_len + 1, np.dtype(dtype)
        self._writer = MDSWriter(out=str(out), columns={"tokens": f"ndarray:{dtype}:{self.width}"},
                                 hashes=HASHES, size_limit=shard_size)
        needed = self._writer.extra_bytes_per_shard + self._writer.extra_bytes_per_sample + \
            self.width * self.dtype.itemsize
        if shard_size < needed:
            raise UserError(f"--shard-size {shard_size} bytes cannot hold one sequence of {self.width} "
                            f"{dtype} ids; use at least {needed} bytes")
        probe = np.arange(self.width, dtype=self.dtype)
        if self._writer.encode_sample({"tokens": probe}) == probe.tobytes():  # true of streaming 0.13's MDS
            self._writer.encode_sample = _raw_bytes  # streaming parses the column's encoding string per sample
        self._pending: list[np.ndarray] = []
        self._pending_len = 0
        self.documents = self.tokens = self.samples = 0

    def add(self, ids: np.ndarray, documents: int = 1) -> None:
        self.documents += documents
        self.tokens += len(ids)
        self._pending.append(ids)
        self._pending_len += len(ids)
        if self._pending_len >= max(self.width, 1 << 20):  # concatenate rarely, not per document
            self._flush()

    def _flush(self) -> None:
        buf = np.concatenate(self._pending).astype(self.dtype, copy=False) if self._pending else \
            np.zeros(0, self.dtype)
        full = len(buf) // self.width
        for row in buf[:full * self.width].reshape(full, self.width):
            self._writer.write({"tokens": row})
        self.samples += full
        self._pending = [buf[full * self.width:].copy()]  # not a view pinning the whole buffer
        self._pending_len = len(self._pending[0])

    def close(self) -> None:
        """Write the last full window and the index; the shorter tail is dropped (`dropped`)."""
        self._flush()
        self._writer.finish()

    @property
    def dropped(self) -> int:
        return self._pending_len


def _raw_bytes(sample: dict) -> bytes:
    return sample["tokens"].tobytes()


def write_dataset(root: Path, fill: Callable[[Writers], None], *, seq_len: int, vocab_size: int,
                  shard_size: int, describe: dict, too_small: Callable[[str, SplitWriter], str] | None = None) -> dict:
    """Let `fill` add ids to root/train and root/val, then write the manifest (last); returns it.

    `describe` gives the manifest's sources, tokenizer, text_field and bad_records (a `BadRecords`,
    read after `fill`, which counts them as it reads). A split without one full sample is an error;
    `too_small(split, writer)` words it for the caller's options.
    """
    dtype = token_dtype(vocab_size)
    writers = {split: SplitWriter(root / split, seq_len, dtype, shard_size) for split in SPLITS}
    fill(writers)
    for writer in writers.values():
        writer.close()
    for split, w in writers.items():
        if not w.samples:
            raise UserError(too_small(split, w) if too_small else
                            f"the {split} split has {w.tokens} tokens, fewer than one sequence of "
                            f"seq_len + 1 = {seq_len + 1}; lower --seq-len or add data")
    per_split = {key: {s: getattr(w, attr) for s, w in writers.items()} for key, attr in
                 (("documents", "documents"), ("tokens", "tokens"), ("samples", "samples"),
                  ("dropped_tokens", "dropped"))}
    manifest = {"format": FORMAT, "sources": describe["sources"], "tokenizer": describe["tokenizer"],
                "vocab_size": vocab_size, "token_dtype": dtype, "seq_len": seq_len,
                "text_field": describe.get("text_field"), **per_split,
                "bad_records": vars(describe.get("bad_records") or BadRecords()),
                "content_hash": content_hash(root)}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def content_hash(root: Path) -> str:
    """The dataset's version: SHA-256 over the split folders' files (relative path, size, bytes), sorted."""
    h = hashlib.sha256()
    files = sorted((p.relative_to(root).as_posix(), p) for split in SPLITS
                   for p in (root / split).rglob("*") if p.is_file())
    for rel, path in files:
        h.update(rel.encode() + b"\0" + path.stat().st_size.to_bytes(8, "little"))
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def staging(out: Path, everyone: bool = False) -> Path:
    """A fresh `.<name>.tmp-<pid>` beside `out`, after removing those of killed runs.

    Another live prepare's folder is kept unless `everyone` (callers holding a lock).
    """
    prefix = f".{out.name}.tmp-"
    for stale in out.parent.iterdir() if out.parent.is_dir() else ():
        pid = stale.name.removeprefix(prefix).split("-")[0]
        if stale.name.startswith(prefix) and (everyone or not pid.isdigit() or not _alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f"{prefix}{os.getpid()}"
    tmp.mkdir(parents=True)
    return tmp


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a folder named after this process is from an earlier one with the same pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def commit(tmp: Path, out: Path, overwrite: bool = False) -> None:
    """Rename the finished `tmp` to `out`; an existing `out` is replaced only with `overwrite`."""
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise UserError(f"{out}: already exists; pass --overwrite to replace it, or choose another --out")
        old = tmp.with_name(f"{tmp.name}-old")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def encode(text: bytes | str) -> np.ndarray:
    """Byte-level tokens of one document, ending with EOD."""
    return np.append(BYTES.encode_batch([text])[0], np.uint16(EOD))


def decode(ids: Iterable[int]) -> str:
    """Text of byte-level ids; EOD becomes a blank line, broken UTF-8 a replacement character."""
    return BYTES.decode(ids)


def write_split(docs: Iterable[bytes], out: Path, seq_len: int, size_limit: int = 1 << 23) -> int:
    """One split of byte-level documents without a manifest (tests, tools); returns its samples."""
    writer = SplitWriter(out, seq_len, "uint16", size_limit)
    for doc in docs:
        writer.add(encode(doc))
    writer.close()
    return writer.samples


def stdlib_files() -> tuple[Path, list[Path]]:
    """The standard library's root and its `.py` files, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    found = []
    for folder, dirs, files in os.walk(root):  # pruned as it goes: never into site-packages
        dirs[:] = [d for d in dirs if d not in skip]
        found += [Path(folder, f) for f in files if f.endswith(".py")]
    return root, sorted(found)


def stdlib_documents() -> list[tuple[str, bytes]]:
    """(relative path, content) of every standard-library `.py` file, in a fixed order."""
    root, paths = stdlib_files()
    return [(p.relative_to(root).as_posix(), p.read_bytes()) for p in paths]


def write_corpus(docs: list[tuple[str, bytes]], out: Path, seq_len: int, val_fraction: float,
                 source: str) -> dict:
    """Write train/ and val/ splits of byte-level documents plus a manifest into `out` (new or empty)."""
    out.mkdir(parents=True, exist_ok=True)

    def fill(writers: Writers) -> None:
        for name, text in docs:
            writers["val" if is_validation(name, val_fraction) else "train"].add(encode(text))

    return write_dataset(out, fill, seq_len=seq_len, vocab_size=BYTE_VOCAB, shard_size=1 << 23,
                         describe={"sources": [{"path": source, "format": "py", "split": "train+val"}],
                                   "tokenizer": BYTES.save(out)})


def _corpus_key(*params: object) -> str:
    """The corpus's cache name from every file's path, size and mtime: a start finds it by a stat per file
    (~0.1 s) instead of reading and hashing the library (seconds). The shards' own content hash, in the
    manifest, is what a checkpoint records."""
    root, paths = stdlib_files()
    h = hashlib.sha256(repr((FORMAT, *params)).encode())
    for p in paths:
        st = p.stat()
        h.update(f"{p.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def ensure_default_corpus(cache_dir: Path, seq_len: int, val_fraction: float) -> tuple[Path, bool]:
    """The folder of the default corpus for these settings, and whether this call built it."""
    final = cache_dir / f"stdlib-{_corpus_key(seq_len, val_fraction)}"
    if (final / MANIFEST).is_file():
        return final, False
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if (final / MANIFEST).is_file():  # another rank built it while we waited
            return final, False
        tmp = staging(final, everyone=True)  # under the lock, every other temporary folder is a dead build's
        try:
            write_corpus(stdlib_documents(), tmp, seq_len, val_fraction, source="python standard library")
            commit(tmp, final, overwrite=True)  # over a half-built leftover without a manifest
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final, True


def default_cache_dir(configured: str | None) -> Path:
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("PREFIX_CACHE_DIR"):
        return Path(os.environ["PREFIX_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "prefix"
