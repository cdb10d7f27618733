"""Training and validation streams over MDS shards with MosaicML Streaming.

Each rank reads its own micro-batches from a `StreamingDataLoader`. The loader's `state_dict()`
goes into every checkpoint so a resume continues mid-epoch with no sample repeated or skipped.
Streaming facts this module is built around:
- the sample order depends on `num_canonical_nodes`, the shuffle seed and algorithm, and the
  per-rank batch size; all are set explicitly, and the first three travel in the state;
- the loader counts only batches handed to the caller, so nothing here fetches ahead;
- its workers start at the first batch asked for (its `__iter__` is a generator); `EagerLoader` starts them
  at `iter()`, so that a start's first batches are fetched while it builds its trainer;
- every `iter()` starts a new epoch, and a state saved exactly at an epoch's end would make the
  resumed epoch yield nothing or a ragged tail; an epoch here is a whole number of global batches
  (the tail is dropped, as `drop_last` would), and a finished epoch is saved as "next epoch, 0";
- a shard that fails validation ends the epoch early without raising, so a short epoch is an error;
- with `cache_limit`, how far streaming downloads ahead is bounded by what the cache holds (see
  `_bound_lookahead`), or its ready thread can wait forever for a shard evicted under it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from prefix.config import Config, parse_size
from prefix.data.compat import StreamingDataLoader, StreamingDataset
from prefix.data.streams import Source, check_shards, remove_corrupt_shards
from prefix.errors import UserError


class IndexedDataset(StreamingDataset):
    """Yields `tokens` as int64 and the sample's dataset `index`, so the order can be audited.

    Token ids stored as `bytes` are little-endian int64, as llm-foundry's converters write them.
    """

    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, Any]:
        tokens = super().get_item(sample_id, retry)["tokens"]
        if isinstance(tokens, bytes):
            tokens = np.frombuffer(tokens, dtype="<i8")
        return {"tokens": np.asarray(tokens, dtype=np.int64), "index": sample_id}

    def on_exception(self, future: Future) -> None:
        """A download thread failed: streaming ends the epoch; say why in one line, not a traceback.

        streaming re-raises inside a future's callback, which only logs a traceback and changes
        nothing else; the short epoch it causes is what stops the run (see TrainStream).
        """
        exception = future.exception()
        if exception is not None:
            self._event.set()
            print(f"streaming: a download thread failed: {type(exception).__name__}: {exception}",
                  file=sys.stderr, flush=True)


class EagerLoader(StreamingDataLoader):
    """streaming's loader, with its workers started by `iter()` instead of by the first batch asked for
    (streaming's `__iter__` is a generator, so none of it runs until then): `TrainStream.start`. The count of
    samples handed out, which its `state_dict` reads, is kept as streaming keeps it."""

    def __iter__(self) -> Iterator[Any]:
        batches = DataLoader.__iter__(self)  # the workers start here
        self.num_samples_yielded = 0
        return self._counted(batches)

    def _counted(self, batches: Iterator[Any]) -> Iterator[Any]:
        for batch in batches:
            self.num_samples_yielded += self._get_batch_size(batch)
            yield batch


def _ignore_stop_signals(_worker_id: int) -> None:
    """Loader workers leave SIGTERM/SIGINT to the main process.

    torchrun forwards SIGTERM with killpg, so workers get it too; if they died, torch's SIGCHLD
    handler would raise in the main process in the middle of its final checkpoint.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _bound_lookahead(ds: IndexedDataset, readers: int, where: str, setting: str) -> None:
    """Keep streaming's download-ahead (`predownload`, in samples) inside the cache.

    Streaming's ready thread waits for a shard to turn from "downloading" to "local" by polling
    every few ms. If in between the download thread, running ahead, fills the cache and evicts that
    very shard as the coldest, the ready thread waits forever (the run hangs: 4 of 20 runs with a
    five-of-eight-shard cache before this bound). Eviction needs every other cached shard touched
    after it, so with `fits` shards in the cache, at most `fits - 2` samples ahead shared among the
    node's readers (ranks per node × loader workers) cannot evict a shard someone still waits for.
    """
    fits = ds.cache_limit // max(shard.get_max_size() for shard in ds.shards)
    ahead = (fits - 2) // readers
    if ahead < 1:
        raise UserError(f"data.cache_limit: {setting} holds {fits} shard(s) of {where}, too few for {readers} "
                        f"reader(s) on this node (ranks per node x max(data.num_workers, 1)); raise it to "
                        f"at least {readers + 2} shards or use fewer loader workers")
    ds.predownload = min(ds.predownload, ahead)


def _dataset(cfg: Config, sources: list[Source], split: str, shuffle: bool,
             workers: int = 0) -> tuple[IndexedDataset, list[tuple[str, int]]]:
    """The split's dataset, checked, and the width (token ids per sample) of each source's samples."""
    d = cfg.data
    where = sources[0].key if len(sources) == 1 else "data.streams"
    for source in sources:
        if source.remote is None and not (source.root / split / "index.json").is_file():
            raise UserError(f"{source.key}: split '{split}' not found under {source.root}; add it or change "
                            f"data.{'train' if split == d.train_split else 'val'}_split")
    try:
        ds = IndexedDataset(
            streams=[s.stream(split) for s in sources], batch_size=cfg.trainer.micro_batch_size,
            shuffle=shuffle, shuffle_seed=cfg.run.seed if d.shuffle_seed is None else d.shuffle_seed,
            shuffle_algo=d.shuffle_algo, shuffle_block_size=d.shuffle_block_size,
            num_canonical_nodes=d.num_canonical_nodes, validate_hash=d.validate_hash,
            cache_limit=parse_size(d.cache_limit) if d.cache_limit else None,
        )
    except (json.JSONDecodeError, KeyError) as e:  # an empty or damaged index.json
        raise UserError(f"data: {where} ({split}): index.json is not a readable MDS index "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); rebuild the dataset") from None
    except ValueError as e:
        if "cache limit" not in str(e).lower():
            raise
        raise UserError(f"data.cache_limit: {d.cache_limit} is too small for {where} "
                        f"({str(e).split('. ')[0]}); raise it") from None
    if ds.cache_limit:
        readers = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) * max(workers, 1)
        _bound_lookahead(ds, readers, f"{where} ({split})", d.cache_limit)
    check_shards(ds, f"{where} ({split})", d.validate_hash)
    widths = []
    for source, offset in zip(sources, ds.sample_offset_per_stream, strict=True):
        width = len(ds[int(offset)]["tokens"])
        if width < cfg.model.seq_len + 1:
            raise UserError(f"model.seq_len: {cfg.model.seq_len} needs samples of {cfg.model.seq_len + 1} "
                            f"tokens but {where} ({split}) holds {width}; lower model.seq_len or rebuild the data")
        widths.append((source.key, width))
    return ds, widths


def cropped(widths: list[tuple[str, int]], seq_len: int) -> list[tuple[str, dict[str, int]]]:
    """Samples wider than seq_len + 1 are cropped: legitimate (a curriculum), but say what it costs.

    The warnings (message, fields) are logged once by rank 0 when the run starts (prefix.train).
    """
    found = []
    for key, width in widths:
        if width > seq_len + 1:
            used, dropped = seq_len + 1, width - seq_len - 1
            found.append((f"{key}: samples hold {width} token ids but model.seq_len={seq_len} trains on the first "
                          f"{used} of each and drops {dropped} ({dropped / width:.0%} of the data); set "
                          f"model.seq_len={width - 1} to use them all, or prepare the data again with "
                          f"--seq-len {seq_len}", {"sample_tokens": width, "used_tokens": used,
                                                   "dropped_tokens": dropped}))
    return found


@dataclass
class Batch:
    inputs: torch.Tensor
    targets: torch.Tensor
    index: torch.Tensor

    @classmethod
    def of(cls, sample: dict[str, np.ndarray], seq_len: int, vocab_size: int, pin: bool = False) -> Batch:
        """Crop to seq_len + 1 ids; an id the model has no embedding for stops the run here, on the CPU.

        `pin` (CUDA): page-locked memory, so the trainer's `.to(device, non_blocking=True)` is a real
        asynchronous copy. Pinned here, not by the DataLoader: its `pin_memory` skips numpy arrays.
        """
        tokens = torch.from_numpy(sample["tokens"][:, : seq_len + 1])
        low, high = torch.aminmax(tokens)
        if low < 0 or high >= vocab_size:
            bad = int(high) if high >= vocab_size else int(low)
            raise UserError(f"data: a sample holds token id {bad}, outside model.vocab_size={vocab_size}; "
                            f"set model.vocab_size to at least {int(high) + 1}, or use data made with the "
                            "model's tokenizer")
        if pin:
            tokens = tokens.pin_memory()  # inputs and targets are views of it, pinned too
        return cls(tokens[:, :-1], tokens[:, 1:], torch.from_numpy(sample["index"]))


def collate(samples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Stack into numpy arrays: a worker then sends a batch as plain bytes through its pipe.

    torch's default collate makes shared-memory tensors, and receiving one waits for the worker
    process to hand over a file descriptor: on a busy CPU that round trip cost ~2 % of a step.
    """
    return {"tokens": np.stack([s["tokens"] for s in samples]), "index": np.array([s["index"] for s in samples])}


def _end_epoch(iterator, dataset: StreamingDataset) -> None:
    """Close a loader iterator early: torch shuts its workers down, streaming stops its threads."""
    iterator.close()
    if getattr(dataset, "_iterator", None) is not None:
        dataset._iterator.exit()  # streaming's download threads when num_workers=0


class TrainStream:
    """Micro-batches for one rank, epoch after epoch, with an exact, resumable position."""

    def __init__(self, cfg: Config, sources: list[Source], accum: int, pin_memory: bool = False):
        self.seq_len, self.vocab_size = cfg.model.seq_len, cfg.model.vocab_size
        self.pin_memory = pin_memory  # page-locked batches for asynchronous copies to a CUDA device
        self.validate_hash = cfg.data.validate_hash
        self.versions = [s.version for s in sources]
        self.dataset, widths = _dataset(cfg, sources, cfg.data.train_split, cfg.data.shuffle,
                                        cfg.data.num_workers)
        self.cropped = cropped(widths, self.seq_len)
        self.loader = EagerLoader(
            self.dataset, batch_size=cfg.trainer.micro_batch_size, num_workers=cfg.data.num_workers,
            worker_init_fn=_ignore_stop_signals if cfg.data.num_workers else None,
            persistent_workers=False, drop_last=False, collate_fn=collate,
        )
        self.global_batch = cfg.trainer.global_batch_size
        self.accum = accum
        self.steps_per_epoch = self.dataset.size // self.global_batch
        if self.steps_per_epoch == 0:
            raise UserError(f"trainer.global_batch_size: {self.global_batch} is more than the "
                            f"{self.dataset.size} samples of the training split; lower it or add data")
        self.epoch = 0
        self.consumed = 0  # micro-batches this rank took in the current epoch
        self._it = None
        self._state: dict[str, Any] | None = None  # the loaded position, until iteration starts

    @property
    def micro_per_epoch(self) -> int:
        return self.steps_per_epoch * self.accum

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a saved position (saved with any world size, same global batch)."""
        self.loader.load_state_dict(state)
        self._state = dict(state)
        self.epoch = state["epoch"]
        self.consumed = state["sample_in_epoch"] // self.global_batch * self.accum

    def state_dict(self) -> dict[str, Any] | None:
        """streaming's position, plus the versions of remote datasets (checked on resume)."""
        if self._it is None:
            return None if self._state is None else {**self._state, "versions": self.versions}
        state = self.loader.state_dict()
        if self.consumed == self.micro_per_epoch:  # the epoch is done: resume at the next one
            state.update(epoch=self.epoch + 1, sample_in_epoch=0)
        return {**state, "versions": self.versions}

    def start(self) -> None:
        """Begin the epoch's iteration now, not at the first `next`: the loader's workers start and fetch the
        first batches while the caller does other work (a start builds its trainer meanwhile)."""
        if self._it is None and self.consumed < self.micro_per_epoch:
            self._it = iter(self.loader)

    def next(self) -> Batch:
        if self.consumed == self.micro_per_epoch:
            self._close_iterator()
            self.epoch += 1
            self.consumed = 0
        if self._it is None:
            self._it = iter(self.loader)
        try:
            sample = next(self._it)
        except StopIteration:
            raise self._short_epoch() from None
        self.consumed += 1
        return Batch.of(sample, self.seq_len, self.vocab_size, self.pin_memory)

    def _short_epoch(self) -> UserError:
        """streaming ends an epoch early when a shard cannot be had; say which, if we can tell."""
        where = f"data: epoch {self.epoch} ended after {self.consumed} of {self.micro_per_epoch} micro-batches"
        bad = remove_corrupt_shards(self.dataset, self.validate_hash)
        if bad:
            return UserError(f"{where}: {len(bad)} downloaded shard(s) failed data.validate_hash="
                             f"{self.validate_hash} ({', '.join(bad[:3])}) and were removed from the cache; "
                             "a restart downloads them again, and if it fails again the remote copy is "
                             "damaged: rebuild it")
        return UserError(f"{where} on this rank; a shard is missing, unreadable or failed validation "
                         "(see streaming's message above), so check or rebuild the dataset")

    def _close_iterator(self) -> None:
        if self._it is not None:
            _end_epoch(self._it, self.dataset)
            self._it = None

    def close(self) -> None:
        self._close_iterator()


class ValStream:
    """The first `eval_batches` micro-batches of this rank's share of the validation split."""

    def __init__(self, cfg: Config, sources: list[Source]):
        self.seq_len, self.vocab_size = cfg.model.seq_len, cfg.model.vocab_size
        self.batches = cfg.trainer.eval_batches
        # A mixture is shuffled so that the first batches represent every stream; still deterministic.
        self.dataset, _ = _dataset(cfg, sources, cfg.data.val_split, shuffle=len(sources) > 1)
        self.loader = StreamingDataLoader(self.dataset, batch_size=cfg.trainer.micro_batch_size,
                                          num_workers=0, collate_fn=collate)

    def __iter__(self):
        it = iter(self.loader)
        try:
            for _, sample in zip(range(self.batches), it, strict=False):
                yield Batch.of(sample, self.seq_len, self.vocab_size)
        finally:
            _end_epoch(it, self.dataset)
