"""Tokenizers for `prefix data prepare`, saved inside the dataset so every later reader agrees.

Three kinds behind one small interface: byte-level (the default, no files), a Hugging Face
`tokenizer.json`, and tiktoken. prefix never downloads: a spec is "bytes", a local file, or a
tiktoken encoding already in tiktoken's cache, and a dataset's saved copy (`save` / `from_entry`)
needs neither network nor cache. Instances pickle, so prepare can ship them to worker processes.
`prefix.data.corpus.encode/decode` are the byte tokenizer with EOD appended and may re-export `BYTES`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from prefix.errors import UserError

EOD_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]")
"""End-of-document tokens looked up in a Hugging Face tokenizer, first found wins."""
ENDOFTEXT = "<|endoftext|>"
CL100K_PAT = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
              r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
"""cl100k_base's split pattern, used for local `.tiktoken` rank files (which carry none)."""
HF_FILE, TIKTOKEN_FILE, MANIFEST = "tokenizer.json", "tokenizer.tiktoken", "manifest.json"


class Tokenizer:
    """Text to ids without end-of-document; prepare appends `eod_id` after every document."""

    kind: str
    name: str
    vocab_size: int
    eod_id: int

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        """The smallest unsigned dtype that holds every id (what shards should store)."""
        return np.uint16 if self.vocab_size <= 1 << 16 else np.uint32

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        raise NotImplementedError

    def encode(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0]

    def decode(self, ids: Iterable[int]) -> str:
        """Documents are decoded one by one and separated by a blank line where `eod_id` stood."""
        arr = np.asarray(list(ids) if isinstance(ids, Iterator) else ids, dtype=np.int64).ravel()
        pieces = np.split(arr, np.flatnonzero(arr == self.eod_id))
        return "\n\n".join(self._decode_piece(p[1:] if k else p) for k, p in enumerate(pieces))

    def _decode_piece(self, ids: np.ndarray) -> str:
        raise NotImplementedError

    def save(self, folder: Path) -> dict:
        """Write this tokenizer's files into `folder`; returns the manifest entry for `from_entry`."""
        return {"kind": self.kind, "name": self.name, "eod_id": self.eod_id, "vocab_size": self.vocab_size}


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0-255 and 256 for end-of-document: needs no files and never fails."""

    kind, name, vocab_size, eod_id = "bytes", "bytes", 257, 256

    def encode_batch(self, texts: list[str | bytes]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode() if isinstance(t, str) else t, dtype=np.uint8).astype(np.uint16)
                for t in texts]

    def _decode_piece(self, ids: np.ndarray) -> str:
        return bytes(ids[(ids >= 0) & (ids < 256)].astype(np.uint8)).decode("utf-8", errors="replace")


BYTES = ByteTokenizer()


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer; special-token text inside documents stays plain text."""

    kind = "huggingface"

    def __init__(self, tok, name: str) -> None:
        self._tok, self.name = tok, name
        tok.encode_special_tokens = True  # "<|endoftext|>" written in a document must not end it
        ids = tok.get_vocab(with_added_tokens=True).values()
        self.vocab_size = max(tok.get_vocab_size(with_added_tokens=True), max(ids, default=-1) + 1)
        found = [i for i in map(tok.token_to_id, EOD_NAMES) if i is not None]
        if not found:
            raise UserError(f"tokenizer {name}: has none of the end-of-document tokens {' '.join(EOD_NAMES)}; "
                            f"add one as a special token to its tokenizer.json, or use another tokenizer")
        self.eod_id = found[0]

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        encodings = self._tok.encode_batch_fast(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=self.dtype) for e in encodings]

    def _decode_piece(self, ids: np.ndarray) -> str:
        return self._tok.decode(ids.tolist(), skip_special_tokens=False)

    def save(self, folder: Path) -> dict:
        """Writes the tokenizer as loaded (not a copy of the source, which may have changed since)."""
        folder.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(folder / HF_FILE))
        return {**super().save(folder), "file": HF_FILE}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._tok.encode_special_tokens = True  # not part of tokenizers' pickled state


class TiktokenTokenizer(Tokenizer):
    """A tiktoken encoding, pickled by value: a worker never goes to tiktoken's registry or network."""

    kind = "tiktoken"

    def __init__(self, name: str, pat_str: str, mergeable_ranks: dict[bytes, int],
                 special_tokens: dict[str, int]) -> None:
        import tiktoken

        self._args = {"name": name, "pat_str": pat_str, "mergeable_ranks": mergeable_ranks,
                      "special_tokens": special_tokens}
        if ENDOFTEXT not in special_tokens:
            raise UserError(f"tiktoken:{name}: has no {ENDOFTEXT} special token to end documents; "
                            "use another encoding or a Hugging Face tokenizer.json")
        self._enc = tiktoken.Encoding(**self._args)
        self.name, self.eod_id, self.vocab_size = name, special_tokens[ENDOFTEXT], self._enc.n_vocab

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=self.dtype) for ids in self._enc.encode_ordinary_batch(texts)]

    def _decode_piece(self, ids: np.ndarray) -> str:
        try:
            data = self._enc.decode_bytes(ids.tolist())
        except (KeyError, OverflowError):  # ids it lacks (holes, a model's padded vocabulary) are skipped
            known = {*self._args["mergeable_ranks"].values(), *self._args["special_tokens"].values()}
            data = self._enc.decode_bytes([i for i in ids.tolist() if i in known])
        return data.decode("utf-8", errors="replace")

    def save(self, folder: Path) -> dict:
        folder.mkdir(parents=True, exist_ok=True)
        ranks = sorted(self._args["mergeable_ranks"].items(), key=lambda kv: kv[1])
        (folder / TIKTOKEN_FILE).write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in ranks))
        return {**super().save(folder), "file": TIKTOKEN_FILE, "pat_str": self._args["pat_str"],
                "special_tokens": self._args["special_tokens"]}

    def __getstate__(self) -> dict:
        return self._args  # tiktoken pickles registered encodings by name, which could mean a download

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)


def load(spec: str) -> Tokenizer:
    """The tokenizer a user names: "bytes", a tokenizer.json (or its folder), or "tiktoken:NAME|PATH"."""
    if spec == "bytes":
        return BYTES
    if spec.startswith("tiktoken:"):
        return _load_tiktoken(spec.removeprefix("tiktoken:"))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / HF_FILE).is_file():
            raise UserError(f"tokenizer {spec!r}: folder has no {HF_FILE}; pass the folder or file that has it")
        path = path / HF_FILE
    if not path.is_file():
        raise UserError(f"tokenizer {spec!r}: no such file, and prefix never downloads; fetch its tokenizer.json "
                        "on a machine with internet and pass the path (or use bytes, tiktoken:NAME, "
                        "or prefix data train-tokenizer)")
    return _hf_file(path, str(path.resolve()))


def from_entry(folder: Path, entry: dict | str) -> Tokenizer:
    """Rebuild a saved tokenizer from its manifest entry and the files in `folder`, offline."""
    where = folder / MANIFEST
    entry = {"kind": "bytes"} if entry == "bytes" else entry  # corpus.py's manifests say just "bytes"
    kind = entry.get("kind") if isinstance(entry, dict) else None
    if kind not in ("bytes", "huggingface", "tiktoken"):
        raise UserError(f"{where}: tokenizer entry {str(entry)[:80]!r} is not understood; "
                        "prepare the dataset again with this version of prefix")
    try:
        tok = BYTES if kind == "bytes" else _hf_file(folder / entry["file"], entry["name"]) \
            if kind == "huggingface" else TiktokenTokenizer(
                entry["name"], entry["pat_str"], _read_ranks(folder / entry["file"]), entry["special_tokens"])
    except KeyError as e:
        raise UserError(f"{where}: tokenizer entry lacks {e}; prepare the dataset again") from None
    if (entry.get("eod_id", tok.eod_id), entry.get("vocab_size", tok.vocab_size)) != (tok.eod_id, tok.vocab_size):
        raise UserError(f"{where}: the tokenizer's eod {tok.eod_id} and vocabulary {tok.vocab_size} differ from "
                        "the recorded ones; restore the dataset's tokenizer files or prepare it again")
    return tok


COPY = "tokenizer"
"""A run's meta/tokenizer/ and an export's tokenizer/: the tokenizer's files and a manifest naming it."""


def save_copy(folder: Path, tokenizer: Tokenizer) -> None:
    """folder/tokenizer/: the files and a manifest.json, read back by `from_dataset(folder / COPY)`."""
    copy = folder / COPY
    copy.mkdir(parents=True, exist_ok=True)
    (copy / MANIFEST).write_text(json.dumps({"tokenizer": tokenizer.save(copy)}))


def from_dataset(root: Path) -> Tokenizer | None:
    """The tokenizer recorded in root/manifest.json; None without one (e.g. MDS data from other tools)."""
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e}); fix or remove the manifest") from None
    entry = manifest.get("tokenizer") if isinstance(manifest, dict) else None
    pretokenized = isinstance(entry, dict) and entry.get("kind") == "pretokenized"  # ids of an unknown tokenizer
    return None if entry is None or pretokenized else from_entry(root, entry)


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE trained on the corpus itself: the offline way to a subword vocabulary."""
    from tokenizers import Tokenizer as Raw
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise UserError(f"tokenizer vocabulary {vocab_size} is too small for byte-level BPE; "
                        "use at least 257 (256 bytes + <|endoftext|>)")
    tok = Raw(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[ENDOFTEXT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return HFTokenizer(tok, f"trained-bpe-{vocab_size}")


def _hf_file(path: Path, name: str) -> HFTokenizer:
    from tokenizers import Tokenizer as Raw

    try:
        tok = Raw.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for missing, unreadable and invalid files
        reason = " ".join(str(e).split())
        raise UserError(f"tokenizer {name}: cannot load {path} ({reason}); pass a tokenizer.json saved by "
                        "Hugging Face tokenizers (tokenizer.save or transformers' save_pretrained)") from None
    return HFTokenizer(tok, name)


class _DownloadRefused(Exception):
    """Raised in place of tiktoken's network fetch; carries the URL."""


_patching = threading.Lock()


def _load_tiktoken(rest: str) -> Tokenizer:
    import tiktoken
    import tiktoken.load

    names = tiktoken.list_encoding_names()
    if rest in names:
        fetch = tiktoken.load.read_file  # what read_file_cached calls on a cache miss: refused for URLs

        def local_only(blobpath: str) -> bytes:
            if "://" in blobpath:
                raise _DownloadRefused(blobpath)
            return fetch(blobpath)

        with _patching:
            tiktoken.load.read_file = local_only
            try:
                enc = tiktoken.get_encoding(rest)
            except _DownloadRefused as e:
                cache = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get(  # as read_file_cached picks it
                    "DATA_GYM_CACHE_DIR", os.path.join(tempfile.gettempdir(), "data-gym-cache")))
                cached = os.path.join(cache, hashlib.sha1(str(e).encode()).hexdigest())
                raise UserError(f"tiktoken:{rest}: {cached} (tiktoken's cache of {e}) is missing or corrupt, "
                                "and prefix never downloads; run tiktoken.get_encoding once on a machine with "
                                "internet and copy its cache folder here (set TIKTOKEN_CACHE_DIR to it)") from e
            finally:
                tiktoken.load.read_file = fetch
        return TiktokenTokenizer(enc.name, enc._pat_str, enc._mergeable_ranks, enc._special_tokens)
    path = Path(rest).expanduser()
    if path.is_file():
        ranks = _read_ranks(path)
        return TiktokenTokenizer(str(path.resolve()), CL100K_PAT, ranks, {ENDOFTEXT: max(ranks.values()) + 1})
    if os.sep in rest or rest.endswith(".tiktoken"):
        raise UserError(f"tokenizer 'tiktoken:{rest}': no such file; pass an existing .tiktoken rank file")
    raise UserError(f"tokenizer 'tiktoken:{rest}': unknown encoding; use one of {', '.join(names)}, "
                    "or tiktoken:/path/to/file.tiktoken")


def _read_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken rank file ("base64(token) rank" lines), read directly: tiktoken's own loader keeps a
    copy of local files in its cache keyed by path, and serves that stale copy after the file changes."""
    try:
        pairs = [line.split() for line in path.read_bytes().splitlines() if line.strip()]
        ranks = {base64.b64decode(token, validate=True): int(rank) for token, rank in pairs}
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable tiktoken rank file ({e}); "
                        "pass a file of 'base64(token) rank' lines such as cl100k_base.tiktoken") from None
    missing = sum(bytes([b]) not in ranks for b in range(256))
    if missing or len(set(ranks.values())) != len(ranks):
        raise UserError(f"{path}: a tiktoken rank file needs all 256 single bytes ({missing} missing) and "
                        "distinct ranks; pass a complete byte-level rank file")
    return ranks
