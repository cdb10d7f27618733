"""`prefix data prepare`: documents or token arrays in; packed MDS `train/` and `val/` splits and a manifest out.

Documents are tokenized in batches by worker processes and handed back in input order, so the
shards are byte-identical for any number of workers; each split's ids are concatenated (an
end-of-document id after every document) and cut into windows of `seq_len + 1`. Everything is
written into a temporary folder beside the output, manifest last, and renamed into place: an
interrupted prepare never leaves a folder that looks finished. The writers, the manifest and the
atomic rename live in `corpus.py`, shared with the default corpus.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from prefix import config
from prefix.data import tokenizers
from prefix.data.corpus import (
    SPLITS,
    SplitWriter,
    Writers,
    commit,
    holdout_bucket,
    is_validation,
    staging,
    write_dataset,
)
from prefix.data.sources import (
    BadRecords,
    Source,
    check_columns,
    find_sources,
    id_range,
    open_tokens,
    read_documents,
)
from prefix.errors import UserError

BATCH_DOCS, BATCH_CHARS = 256, 4 << 20
"""A batch for one worker: big enough to amortize the inter-process copy, small enough to stay ordered."""
ARRAY_CHUNK = 1 << 22
"""Token-array ids copied out of a memory map at a time."""
START_METHOD = "spawn"
"""Not fork: the parent has threads (tqdm, streaming, a tokenizer's pool). Not the fork server: it
outlives a SIGKILLed prepare, and so do the workers it forked."""


# Tokenizing documents: in this process, or in worker processes with results kept in input order.

Batch = tuple[list, list[bool]]
_worker: tuple[tokenizers.Tokenizer, np.dtype] | None = None


def _start_worker(parent: int, tokenizer: tokenizers.Tokenizer, dtype: np.dtype) -> None:
    global _worker
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already; no thread pools per worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    _worker = (tokenizer, dtype)


def _exit_with_parent(parent: int) -> None:
    """A SIGKILLed prepare leaves workers blocked on a queue whose pipe they hold open themselves.

    `parent` comes from the parent: it may have died before this worker could ask for its pid.
    """
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _tokenize_in_worker(batch: Batch) -> tuple[np.ndarray, int, np.ndarray, int]:
    assert _worker is not None
    return _tokenize(*_worker, batch)


def _tokenize(tokenizer: tokenizers.Tokenizer, dtype: np.dtype, batch: Batch) -> tuple[np.ndarray, int, np.ndarray, int]:
    """The batch's train and val id streams (each document followed by end-of-document), and document counts."""
    texts, held_out = batch
    eod = np.array([tokenizer.eod_id], dtype=dtype)
    parts: dict[bool, list[np.ndarray]] = {False: [], True: []}
    for ids, val in zip(tokenizer.encode_batch(texts), held_out, strict=True):
        parts[val] += (ids, eod)
    train, val = (np.concatenate(p).astype(dtype, copy=False) if p else np.zeros(0, dtype)
                  for p in (parts[False], parts[True]))
    return train, len(parts[False]) // 2, val, len(parts[True]) // 2


def _batches(docs: Iterable[tuple[bool, str | bytes]]) -> Iterator[tuple[Batch, int]]:
    texts: list = []
    held_out: list[bool] = []
    chars = 0
    for val, text in docs:
        texts.append(text)
        held_out.append(val)
        chars += len(text)
        if len(texts) >= BATCH_DOCS or chars >= BATCH_CHARS:
            yield (texts, held_out), chars
            texts, held_out, chars = [], [], 0
    if texts:
        yield (texts, held_out), chars


def _tokenized(docs: Iterable[tuple[bool, str | bytes]], tokenizer: tokenizers.Tokenizer, dtype: np.dtype,
               workers: int) -> Iterator[tuple[int, tuple[np.ndarray, int, np.ndarray, int]]]:
    """(characters, result) per batch, in input order.

    Not `Pool.imap`: its feeder thread reads the whole input ahead into memory, and a worker killed
    (out of memory) makes it wait forever. Here at most two batches per worker are in flight, a dead
    worker raises `BrokenProcessPool`, and documents are read in this thread.
    """
    if workers == 1:
        for batch, chars in _batches(docs):
            yield chars, _tokenize(tokenizer, dtype, batch)
        return
    pool = ProcessPoolExecutor(workers, mp_context=get_context(START_METHOD), initializer=_start_worker,
                               initargs=(os.getpid(), tokenizer, dtype))
    try:
        pending: deque = deque()
        for batch, chars in _batches(docs):
            pending.append((chars, pool.submit(_tokenize_in_worker, batch)))
            if len(pending) > 2 * workers:
                chars, result = pending.popleft()
                yield chars, result.result()
        while pending:
            chars, result = pending.popleft()
            yield chars, result.result()
    finally:
        pool.shutdown(cancel_futures=True)


def tokenize_into(writers: Writers, docs: Iterable[tuple[bool, str | bytes]], tokenizer: tokenizers.Tokenizer,
                  workers: int = 1, bar=None) -> None:
    """Tokenize (held out?, text) documents into the split writers; the same ids for any `workers`."""
    dtype = writers["train"].dtype
    with contextlib.closing(_tokenized(docs, tokenizer, dtype, workers)) as results:  # ends the pool on errors
        for chars, (train, n_train, val, n_val) in results:
            writers["train"].add(train, n_train)
            writers["val"].add(val, n_val)
            if bar is not None:
                bar.update(chars)


def arrays_into(writers: Writers, arrays: list[tuple[Source, np.ndarray]], val_fraction: float, bar=None) -> None:
    """Token arrays as they are: --val ones to val; without --val, each array's last `val_fraction` too."""
    has_val = any(source.held_out for source, _ in arrays)
    for source, array in arrays:
        cut = 0 if source.held_out else len(array) if has_val else len(array) - round(len(array) * val_fraction)
        for split, part in (("train", array[:cut]), ("val", array[cut:])):
            for start in range(0, len(part), ARRAY_CHUNK):
                chunk = np.asarray(part[start:start + ARRAY_CHUNK])
                writers[split].add(chunk, documents=int(start == 0))
                if bar is not None:
                    bar.update(chunk.nbytes)


# The command: check everything that can be checked, then build in a temporary folder and rename it.

def prepare(inputs: Iterable[str], out: str | Path, *, val: Iterable[str] = (), tokenizer: str | None = None,
            text_field: str = "text", seq_len: int = 256, val_fraction: float = 0.01, workers: int = 1,
            bin_dtype: str = "uint16", vocab_size: int | None = None, shard_size: str | int = "64mb",
            overwrite: bool = False, progress: bool | None = None) -> dict:
    """Prepare a dataset at `out` and return its manifest. `tokenizer` None: bytes (text), none (arrays)."""
    out, size_limit = Path(out).expanduser(), shard_bytes(shard_size)
    _check_options(seq_len, val_fraction, workers, bin_dtype, vocab_size)
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it, or choose another --out")
    skip = out if out.exists() else None  # a dataset inside its own input folder, prepared again
    sources = _distinct(find_sources(inputs, exclude=skip) + find_sources(val, held_out=True, exclude=skip))
    for source in sources:
        check_columns(source, text_field)
    tok = tokenizers.load(tokenizer or "bytes") if tokenizer or not sources[0].tokens else None
    arrays = [(s, open_tokens(s, bin_dtype)) for s in sources] if sources[0].tokens else []
    vocab = _vocabulary(arrays, tok, vocab_size)
    has_val = any(s.held_out for s in sources)
    describe = {"sources": [{"path": str(s.path.resolve()), "format": s.format,
                             "split": "val" if s.held_out else "train" if has_val else "train+val"}
                            | ({"dataset": s.dataset} if s.dataset else {}) for s in sources],
                "text_field": None if arrays else text_field}
    bad, held = BadRecords(), _Holdout()
    docs = held.split(sources, text_field, bad, val_fraction) if not has_val else \
        ((s.held_out, text) for s in sources for _, text in read_documents(s, text_field, bad))
    too_small = _TooSmall(seq_len, val_fraction, has_val, sum(len(a) for _, a in arrays) if arrays else None, held)
    from tqdm import tqdm

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = staging(out)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create it ({e.strerror}); choose a writable folder") from None
    try:
        with tqdm(total=sum(s.path.stat().st_size for s in sources), unit="B", unit_scale=True, desc="prepare",
                  file=sys.stderr, disable=not (sys.stderr.isatty() if progress is None else progress)) as bar:
            entry = tok.save(tmp) if tok is not None else {}
            describe["tokenizer"] = entry if not arrays else {**entry, "pretokenized": True} if entry else \
                {"kind": "pretokenized"}  # ids of an unnamed tokenizer: no decoding, no samples
            fill = (lambda w: arrays_into(w, arrays, val_fraction, bar)) if arrays else \
                (lambda w: tokenize_into(w, docs, tok, workers, bar))
            manifest = write_dataset(tmp, fill, seq_len=seq_len, vocab_size=vocab, shard_size=size_limit,
                                     describe=describe | {"bad_records": bad}, too_small=too_small)
            bar.update(bar.total - bar.n)
        commit(tmp, out, overwrite)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise UserError(f"--out {out}: writing failed ({e.strerror}); free space or choose another "
                            "folder") from None
        raise
    return manifest


@dataclass
class _Holdout:
    """Documents split by the hash of their identity, and what it would take to hold out one more."""

    documents: int = 0
    lowest_train: int = 100_000
    """The smallest hash bucket among the training documents (see `corpus.holdout_bucket`)."""

    def split(self, sources: list[Source], text_field: str, bad: BadRecords,
              val_fraction: float) -> Iterator[tuple[bool, str | bytes]]:
        for source in sources:
            for identity, text in read_documents(source, text_field, bad):
                self.documents += 1
                held_out = is_validation(identity, val_fraction)
                if not held_out:
                    self.lowest_train = min(self.lowest_train, holdout_bucket(identity))
                yield held_out, text

    def fraction_for_one_more(self) -> float | None:
        """The smallest --val-fraction (3 decimals) that holds out one training document more, if any."""
        needed = math.ceil((self.lowest_train + 1) / 100) / 1000
        return needed if needed < 1 else None


@dataclass
class _TooSmall:
    """One line for a split without one full sample: what it got, and the options that fix it."""

    seq_len: int
    val_fraction: float
    has_val: bool
    array_ids: int | None  # token arrays: all their ids; None for text
    held: _Holdout

    def __call__(self, split: str, w: SplitWriter) -> str:
        width = self.seq_len + 1
        short = f"fewer than one sample of --seq-len {self.seq_len} + 1 = {width}"
        shorter = [f"lower --seq-len to {w.tokens - 1} or less"] if w.tokens >= 2 else []
        docs = "" if self.array_ids is not None else f" in {w.documents} document(s)"
        if split == "train":
            fixes = ["add training data"]
            if not self.has_val and self.val_fraction > 0:
                fixes.append(f"lower --val-fraction (now {self.val_fraction})")
            return f"the train split holds {w.tokens} tokens{docs}, {short}; {_either(fixes + shorter)}"
        if self.has_val:
            return (f"the val split (the --val inputs) holds {w.tokens} tokens{docs}, {short}; "
                    f"{_either(['pass more validation data with --val', *shorter])}")
        fixes = ["name validation files with --val FILE", *shorter]
        if self.array_ids is not None:
            needed = math.ceil(width / max(self.array_ids, 1) * 1000) / 1000
            raise_it = f"raise --val-fraction to {needed} or more" if needed < 1 else "raise --val-fraction"
            return (f"the val split got {w.tokens} tokens (the last {self.val_fraction} of each token array's "
                    f"ids, {self.array_ids} ids in all), {short}; {_either([raise_it, *fixes])}")
        if w.documents == 0:
            needed = self.held.fraction_for_one_more()
            raise_it = f"raise --val-fraction to {needed} or more (that holds out at least one)" if needed \
                else "raise --val-fraction"
            return (f"the val split got no documents: --val-fraction {self.val_fraction} held out none of the "
                    f"{self.held.documents} documents (whole documents, chosen by a hash of their name); "
                    f"{_either([raise_it, *fixes])}")
        return (f"the val split holds {w.tokens} tokens{docs} (--val-fraction {self.val_fraction} of "
                f"{self.held.documents} documents), {short}; "
                f"{_either(['raise --val-fraction', *fixes])}")


def _either(fixes: list[str]) -> str:
    return ", ".join(fixes[:-1]) + " or " + fixes[-1] if len(fixes) > 1 else fixes[0]


def _check_options(seq_len: int, val_fraction: float, workers: int, bin_dtype: str, vocab_size: int | None) -> None:
    for ok, problem in ((seq_len >= 1, f"--seq-len {seq_len}: must be 1 or more"),
                        (0 <= val_fraction < 1, f"--val-fraction {val_fraction}: must be at least 0 and below 1"),
                        (workers >= 1, f"--workers {workers}: must be 1 or more"),
                        (bin_dtype in ("uint16", "uint32"), f"--bin-dtype {bin_dtype}: use uint16 or uint32"),
                        (vocab_size is None or 1 <= vocab_size <= 1 << 32,
                         f"--vocab-size {vocab_size}: must be between 1 and 2^32")):
        if not ok:
            raise UserError(problem)


def _distinct(sources: list[Source]) -> list[Source]:
    """Each file once (a folder and a glob may both match it), all text or all token arrays."""
    if not sources:
        raise UserError("no inputs; name files, folders or quoted glob patterns")
    kinds = {s.tokens: s for s in sources}
    if len(kinds) == 2:
        raise UserError(f"{kinds[True].path} is a token array but {kinds[False].path} is text: they cannot be "
                        "prepared together; tokenize the text with the array's tokenizer in a separate dataset")
    seen: dict[Path, Source] = {}
    for s in sources:
        first = seen.setdefault(s.path.resolve(), s)
        if first.held_out != s.held_out:
            raise UserError(f"{s.path}: given both as training input and with --val; name it once")
    return list(seen.values())


def _vocabulary(arrays: list[tuple[Source, np.ndarray]], tok: tokenizers.Tokenizer | None,
                vocab_size: int | None) -> int:
    """--vocab-size, else the tokenizer's, else the largest id in the arrays + 1; checked against the ids."""
    if not arrays:
        assert tok is not None
        if vocab_size is not None and vocab_size < tok.vocab_size:
            raise UserError(f"--vocab-size {vocab_size}: smaller than tokenizer {tok.name}'s {tok.vocab_size} ids; "
                            "raise it or leave it out")
        return vocab_size or tok.vocab_size
    ranges = [(s, *id_range(a)) for s, a in arrays]
    highest = max(hi for _, _, hi in ranges)
    vocab = vocab_size or (tok.vocab_size if tok is not None else highest + 1)
    for source, low, high in ranges:
        if low < 0 or high >= vocab:
            raise UserError(f"{source.path}: ids from {low} to {high} do not fit a vocabulary of {vocab}; "
                            "check --bin-dtype, --vocab-size and --tokenizer")
    if vocab < 1:
        raise UserError("the token arrays are empty; pass arrays with token ids")
    return vocab


def shard_bytes(size: str | int) -> int:
    value = config.parse_size(size) or 0
    if not 0 < value < 1 << 32:
        raise UserError(f"--shard-size {size!r}: use a size below 4gb such as 64mb, 512kb or 1000000")
    return value


def summary(manifest: dict, out: Path, seconds: float) -> str:
    """The one line `prefix data prepare` prints at the end."""
    def num(n: float) -> str:
        return f"{n / 1e9:.2f}G" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,.0f}"

    splits = "; ".join(f"{s} {num(manifest['documents'][s])} documents, {num(manifest['tokens'][s])} tokens, "
                       f"{num(manifest['samples'][s])} sequences" for s in SPLITS)
    docs, tokens, bad = (sum(manifest[k].values()) for k in ("documents", "tokens", "bad_records"))
    rate = max(seconds, 1e-9)
    skipped = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in manifest["bad_records"].items())
    return (f"prepared {out} ({manifest['content_hash']}): {splits}; {seconds:.1f} s, {num(docs / rate)} documents/s, "
            f"{num(tokens / rate)} tokens/s; bad records: {bad} ({skipped})")
