"""Which datasets a run reads: the default corpus, one folder, a remote with a local cache, or a mixture.

Every configuration becomes a list of `Source`s, each turned into one streaming `Stream` per split.
Streaming facts this module is built around:
- a local folder that already holds `index.json` is trusted as it is and the remote's index is never
  fetched again, so the cache of a remote lives in `<data.local>/<version>/`, where the version is
  the dataset's `content_hash` (from its manifest) or a hash of its index files: a rewritten remote
  gets a fresh cache instead of being read as the old one;
- `cache_limit` evicts shards it thinks it can download again: config validation allows it only
  when every dataset has a remote;
- a shard that fails `validate_hash` is reported only by a background thread and ends the epoch
  early; `corrupt_shards` names the culprits once the loader notices the short epoch.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefix import distributed
from prefix.config import Config
from prefix.data import tokenizers
from prefix.data.corpus import MANIFEST, default_cache_dir, ensure_default_corpus
from prefix.data.tokenizers import Tokenizer
from prefix.distributed import World
from prefix.errors import UserError


@dataclass(frozen=True)
class Source:
    """One dataset: `root` holds its split folders (the cache, when it has a remote)."""

    key: str
    """The config key it came from, for messages: data.local or data.streams[i]."""
    root: Path
    remote: str | None = None
    proportion: float | None = None
    repeat: float | None = None
    choose: int | None = None
    version: str | None = None

    def stream(self, split: str) -> Any:
        from prefix.data.compat import streaming

        remote = None if self.remote is None else f"{self.remote.rstrip('/')}/{split}"
        return streaming.Stream(local=str(self.root / split), remote=remote, proportion=self.proportion,
                                repeat=self.repeat, choose=self.choose)

    def manifest(self) -> dict[str, Any] | None:
        path = self.root / MANIFEST
        return json.loads(path.read_text()) if path.is_file() else None


def _fetch(remote: str, name: str, folder: Path) -> Path | None:
    """Copy `<remote>/<name>` into `folder` with streaming's downloaders; None if it does not exist."""
    from prefix.data.compat import streaming

    local = folder / name.replace("/", "__")
    try:
        streaming.base.storage.CloudDownloader.direct_download(f"{remote.rstrip('/')}/{name}", str(local), 60)
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001 (each object store raises its own errors)
        if "not found" in str(e).lower() or "404" in str(e) or "NoSuchKey" in str(e):
            return None
        raise UserError(f"data.remote: cannot read {remote}/{name} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:150]}); check the URL and the storage credentials") from None
    return local


def remote_version(remote: str, splits: tuple[str, ...], cache_root: Path) -> str:
    """The dataset's version, and its manifest and tokenizer copied into the cache it keys."""
    with tempfile.TemporaryDirectory() as tmp:
        manifest = _fetch(remote, MANIFEST, Path(tmp))
        if manifest is not None:
            meta = json.loads(manifest.read_text())
            version = meta.get("content_hash") or hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
            extra = [meta["tokenizer"]["file"]] if meta.get("tokenizer", {}).get("file") else []
            folder = cache_root / version
            folder.mkdir(parents=True, exist_ok=True)
            for name in extra:
                fetched = _fetch(remote, name, Path(tmp))
                if fetched is not None:
                    os.replace(fetched, folder / name)
            os.replace(manifest, folder / MANIFEST)  # last: its presence says the copy is complete
            return version
        digest = hashlib.sha256()
        for split in splits:
            index = _fetch(remote, f"{split}/index.json", Path(tmp))
            if index is None:
                raise UserError(f"data.remote: no MDS dataset at {remote}/{split} (index.json missing); "
                                "check the URL, or prepare the dataset there")
            digest.update(index.read_bytes())
        return digest.hexdigest()[:16]


def _local_source(key: str, local: str, remote: str | None, world: World, cfg: Config, **weights: Any) -> Source:
    root = Path(local).expanduser()
    if remote is None:
        if not (root / cfg.data.train_split / "index.json").is_file():
            raise UserError(f"{key}: no MDS dataset at {root / cfg.data.train_split} (index.json missing); "
                            "point it at a folder with train/ and val/ splits (see prefix data prepare)")
        return Source(key, root, **weights)
    splits = (cfg.data.train_split, cfg.data.val_split)
    mine = remote_version(remote, splits, root)
    version = distributed.broadcast(world, mine)
    if version != mine:
        raise UserError(f"{key}: the dataset at {remote} changed while the job started; start it again")
    return Source(key, root / version, remote, version=version, **weights)


def resolve(cfg: Config, world: World, log: Any) -> list[Source]:
    """The run's datasets, with the default corpus built and remote caches keyed by version."""
    d = cfg.data
    if d.streams:
        return [_local_source(f"data.streams[{i}]", s.local, s.remote, world, cfg, proportion=s.proportion,
                              repeat=s.repeat, choose=s.choose)
                for i, s in enumerate(d.streams)]
    if d.local is not None:
        return [_local_source("data.local", d.local, d.remote, world, cfg)]
    start, cache = time.monotonic(), default_cache_dir(d.cache_dir)
    try:
        root, built = ensure_default_corpus(cache, cfg.model.seq_len, d.val_fraction)
    except OSError as e:
        raise UserError(f"data.cache_dir: cannot build the default corpus in {cache} ({e.strerror}); "
                        "set data.cache_dir or PREFIX_CACHE_DIR to a writable folder") from None
    if built:
        log.info("built the default corpus", path=str(root), seconds=round(time.monotonic() - start, 1))
    return [Source("data", root)]


def check_vocab(sources: list[Source], vocab_size: int, init_from: str | None = None) -> None:
    """Refuse a model too small for a dataset's tokenizer before anything is trained."""
    for source in sources:
        needed = (source.manifest() or {}).get("vocab_size", 0)
        if needed > vocab_size and init_from:
            raise UserError(f"model.init_from: the model in {init_from} has {vocab_size} token ids, too few for "
                            f"{source.key} (its tokenizer needs {needed}); train on data tokenized with the "
                            "model's own tokenizer, or start from another model")
        if needed > vocab_size:
            raise UserError(f"model.vocab_size: {vocab_size} cannot hold the token ids of {source.key} "
                            f"(its tokenizer needs {needed}); set model.vocab_size={needed} or more")


def tokenizer(sources: list[Source]) -> Tokenizer | None:
    """The tokenizer the datasets were prepared with (for samples); a mixture must agree on one."""
    found = {s.key: tokenizers.from_dataset(s.root) for s in sources}
    known = {key: tok for key, tok in found.items() if tok is not None}
    names = {(tok.kind, tok.name, tok.vocab_size) for tok in known.values()}
    if len(names) > 1:
        listed = ", ".join(f"{key}: {tok.kind} {tok.name}" for key, tok in known.items())
        raise UserError(f"data.streams: the datasets were prepared with different tokenizers ({listed}); "
                        "prepare them all with the same --tokenizer")
    return next(iter(known.values()), None)


def check_shards(dataset: Any, where: str, validate_hash: str | None) -> None:
    """Token ids must be a `tokens` column: an integer ndarray, or bytes of int64 (llm-foundry).

    And the hash to validate downloads with must be recorded: streaming would only complain in a
    background thread.
    """
    for shard in dataset.shards:
        if validate_hash and validate_hash not in (shard.raw_data.hashes or {}):
            raise UserError(f"data.validate_hash: {validate_hash} is not recorded in {where}'s index.json "
                            f"(it has: {', '.join(sorted(shard.raw_data.hashes or {})) or 'none'}); "
                            "pick one of those or unset it")
        names, encodings = getattr(shard, "column_names", None), getattr(shard, "column_encodings", None)
        if names is None:
            raise UserError(f"data: {where} is not in MDS format; prepare it with prefix data prepare")
        if "tokens" not in names:
            raise UserError(f"data: {where} has no 'tokens' column (columns: {', '.join(names)}); "
                            "prepare it with prefix data prepare")
        encoding = encodings[names.index("tokens")]
        dtype = encoding.split(":")[1] if encoding.startswith("ndarray:") else ""
        if not (encoding == "bytes" or encoding == "ndarray" or "int" in dtype):
            raise UserError(f"data: {where} stores 'tokens' as {encoding}, not token ids (an integer "
                            "ndarray, or bytes of int64); prepare it with prefix data prepare")


def remove_corrupt_shards(dataset: Any, algo: str | None) -> list[str]:
    """Delete cached shards that do not match their recorded hash; returns their paths.

    streaming leaves a shard that failed validation in the cache and trusts it on the next start,
    so it goes: the next start downloads it again.
    """
    from prefix.data.compat import streaming

    bad = []
    for stream_id, shard in zip(dataset.stream_per_shard, dataset.shards, strict=True) if algo else []:
        info = shard.raw_data
        path = Path(shard.dirname) / shard.split / info.basename
        if path.is_file() and dataset.streams[stream_id].remote is not None:
            if streaming.base.hashing.get_hash(algo, path.read_bytes()) != info.hashes[algo]:
                path.unlink()
                bad.append(str(path))
    return bad
