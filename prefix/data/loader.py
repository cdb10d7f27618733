"""Training and validation streams over MDS shards with MosaicML Streaming.

Each rank reads its own micro-batches from a `StreamingDataLoader`. The loader's `state_dict()`
goes into every checkpoint so a resume continues mid-epoch with no sample repeated or skipped.
Streaming facts this module is built around:
- the sample order depends on `num_canonical_nodes`, the shuffle seed and algorithm, and the
  per-rank batch size; all are set explicitly, and the first three travel in the state;
- the loader counts only batches handed to the caller, so nothing here fetches ahead;
- every `iter()` starts a new epoch, and a state saved exactly at an epoch's end would make the
  resumed epoch yield nothing or a ragged tail; an epoch here is a whole number of global batches
  (the tail is dropped, as `drop_last` would), and a finished epoch is saved as "next epoch, 0";
- a shard that fails validation ends the epoch early without raising, so a short epoch is an error.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prefix.config import Config
from prefix.data.compat import StreamingDataLoader, StreamingDataset
from prefix.data.corpus import MANIFEST, default_cache_dir, ensure_default_corpus
from prefix.errors import UserError


class IndexedDataset(StreamingDataset):
    """Yields `tokens` as int64 and the sample's dataset `index`, so the order can be audited."""

    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, Any]:
        sample = super().get_item(sample_id, retry)
        return {"tokens": np.asarray(sample["tokens"], dtype=np.int64), "index": sample_id}


def _ignore_stop_signals(_worker_id: int) -> None:
    """Loader workers leave SIGTERM/SIGINT to the main process.

    torchrun forwards SIGTERM with killpg, so workers get it too; if they died, torch's SIGCHLD
    handler would raise in the main process in the middle of its final checkpoint.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def resolve_data_root(cfg: Config, log: Any) -> Path:
    """Folder (local cache) holding the split folders; builds the default corpus if none is set."""
    d = cfg.data
    if d.local is None:
        start, cache = time.monotonic(), default_cache_dir(d.cache_dir)
        try:
            root, built = ensure_default_corpus(cache, cfg.model.seq_len, d.val_fraction)
        except OSError as e:
            raise UserError(f"data.cache_dir: cannot build the default corpus in {cache} ({e.strerror}); "
                            "set data.cache_dir or PREFIX_CACHE_DIR to a writable folder") from None
        if built:
            log.info("built the default corpus", path=str(root), seconds=round(time.monotonic() - start, 1))
        return root
    root = Path(d.local).expanduser()
    if d.remote is None and not (root / d.train_split / "index.json").is_file():
        raise UserError(f"data.local: no MDS dataset at {root / d.train_split} (index.json missing); "
                        "point data.local at a folder with train/ and val/ splits, or unset it "
                        "to use the default corpus")
    return root


def check_vocab(root: Path, vocab_size: int) -> None:
    manifest = root / MANIFEST
    if manifest.is_file():
        needed = json.loads(manifest.read_text()).get("vocab_size", 0)
        if needed > vocab_size:
            raise UserError(f"model.vocab_size: {vocab_size} cannot hold this dataset's token ids "
                            f"(its tokenizer needs {needed}); set model.vocab_size={needed} or more")


def _dataset(cfg: Config, root: Path, split: str, shuffle: bool) -> IndexedDataset:
    d = cfg.data
    remote = None if d.remote is None else f"{d.remote.rstrip('/')}/{split}"
    if remote is None and not (root / split / "index.json").is_file():
        raise UserError(f"data: split '{split}' not found under {root}; add it or change "
                        f"data.{'train' if split == d.train_split else 'val'}_split")
    try:
        ds = IndexedDataset(
            local=str(root / split), remote=remote, batch_size=cfg.trainer.micro_batch_size,
            shuffle=shuffle, shuffle_seed=cfg.run.seed if d.shuffle_seed is None else d.shuffle_seed,
            shuffle_algo=d.shuffle_algo, shuffle_block_size=d.shuffle_block_size,
            num_canonical_nodes=d.num_canonical_nodes,
        )
    except (json.JSONDecodeError, KeyError) as e:  # an empty or damaged index.json
        raise UserError(f"data: {root / split}/index.json is not a readable MDS index ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120]}); rebuild the dataset") from None
    width = len(ds[0]["tokens"])
    if width < cfg.model.seq_len + 1:
        raise UserError(f"model.seq_len: {cfg.model.seq_len} needs samples of {cfg.model.seq_len + 1} "
                        f"tokens but {root / split} holds {width}; lower model.seq_len or rebuild the data")
    return ds


@dataclass
class Batch:
    inputs: torch.Tensor
    targets: torch.Tensor
    index: torch.Tensor

    @classmethod
    def of(cls, sample: dict[str, torch.Tensor], seq_len: int) -> Batch:
        tokens = sample["tokens"][:, : seq_len + 1]
        return cls(tokens[:, :-1], tokens[:, 1:], sample["index"])


def _end_epoch(iterator, dataset: StreamingDataset) -> None:
    """Close a loader iterator early: torch shuts its workers down, streaming stops its threads."""
    iterator.close()
    if getattr(dataset, "_iterator", None) is not None:
        dataset._iterator.exit()  # streaming's download threads when num_workers=0


class TrainStream:
    """Micro-batches for one rank, epoch after epoch, with an exact, resumable position."""

    def __init__(self, cfg: Config, root: Path, accum: int):
        self.seq_len = cfg.model.seq_len
        self.dataset = _dataset(cfg, root, cfg.data.train_split, cfg.data.shuffle)
        self.loader = StreamingDataLoader(
            self.dataset, batch_size=cfg.trainer.micro_batch_size, num_workers=cfg.data.num_workers,
            worker_init_fn=_ignore_stop_signals if cfg.data.num_workers else None,
            persistent_workers=False, drop_last=False,
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
        if self._it is None:
            return self._state
        state = self.loader.state_dict()
        if self.consumed == self.micro_per_epoch:  # the epoch is done: resume at the next one
            state.update(epoch=self.epoch + 1, sample_in_epoch=0)
        return state

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
            raise UserError(f"data: epoch {self.epoch} ended after {self.consumed} of "
                            f"{self.micro_per_epoch} micro-batches on this rank; a shard is missing "
                            "or failed validation, so check or rebuild the dataset") from None
        self.consumed += 1
        return Batch.of(sample, self.seq_len)

    def _close_iterator(self) -> None:
        if self._it is not None:
            _end_epoch(self._it, self.dataset)
            self._it = None

    def close(self) -> None:
        self._close_iterator()


class ValStream:
    """The first `eval_batches` micro-batches of this rank's share of the validation split."""

    def __init__(self, cfg: Config, root: Path):
        self.seq_len = cfg.model.seq_len
        self.batches = cfg.trainer.eval_batches
        self.dataset = _dataset(cfg, root, cfg.data.val_split, shuffle=False)
        self.loader = StreamingDataLoader(self.dataset, batch_size=cfg.trainer.micro_batch_size,
                                          num_workers=0)

    def __iter__(self):
        it = iter(self.loader)
        try:
            for _, sample in zip(range(self.batches), it, strict=False):
                yield Batch.of(sample, self.seq_len)
        finally:
            _end_epoch(it, self.dataset)
