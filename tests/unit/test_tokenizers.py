"""Tokenizers with the real libraries: round trips, saving with a dataset, pickling, offline refusals."""

import base64
import json
import pickle
import random
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from prefix.data import corpus
from prefix.data import tokenizers as tk
from prefix.errors import UserError

WORDS = ("the", "then", "thin", "in", "into", "cat", "hat", "data", "model", "token", "über", "naïve",
         "日本語", "🙂", "def", "return", "x", "=", "+", "(", ")", ":")


@pytest.fixture(scope="module")
def texts() -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20))) + rng.choice(["\n", ".", ""])
            for _ in range(400)]


@pytest.fixture(scope="module")
def bpe(texts):
    return tk.train_bpe(texts, 320)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty tiktoken cache, proxies nowhere, and a record of every attempted connection."""
    attempts: list[object] = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError("network disabled by test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    return attempts


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def save_dataset(tok: tk.Tokenizer, root: Path) -> dict:
    entry = tok.save(root)
    (root / "manifest.json").write_text(json.dumps({"vocab_size": tok.vocab_size, "tokenizer": entry}))
    return entry


def test_bytes_agree_with_corpus():
    tok = tk.load("bytes")
    assert (tok.kind, tok.name, tok.vocab_size, tok.eod_id) == ("bytes", "bytes", corpus.BYTE_VOCAB, corpus.EOD)
    text = "héllo, 世界 🙂\n"
    ids = tok.encode(text)
    assert np.array_equal(np.append(ids, tok.eod_id), corpus.encode(text)) and ids.dtype == np.uint16
    both = np.concatenate([ids, [tok.eod_id], tok.encode("b")])
    assert tok.decode(both) == corpus.decode(both.tolist()) == text + "\n\nb"
    assert tok.decode([0xC3]) == "\ufffd"
    assert pickle.loads(pickle.dumps(tok)).decode(ids) == text


def test_trained_bpe_round_trip(bpe, texts, tmp_path):
    assert bpe.kind == "huggingface" and bpe.eod_id == 0 and bpe.vocab_size <= 320
    ids = bpe.encode_batch(texts)
    assert max(int(i.max()) for i in ids) < bpe.vocab_size
    assert sum(map(len, ids)) < sum(len(t.encode()) for t in texts) * 0.6  # it learned merges
    assert all(bpe.decode(i) == t for i, t in zip(ids, texts, strict=True))
    joined = np.concatenate([ids[0], [bpe.eod_id], ids[1]])
    assert bpe.decode(joined) == texts[0] + "\n\n" + texts[1]
    assert same(pickle.loads(pickle.dumps(bpe)).encode_batch(texts), ids)

    entry = save_dataset(bpe, tmp_path)
    assert entry == {"kind": "huggingface", "name": "trained-bpe-320", "file": "tokenizer.json",
                     "eod_id": bpe.eod_id, "vocab_size": bpe.vocab_size}
    again = tk.from_dataset(tmp_path)
    assert (again.name, again.vocab_size, again.eod_id) == (bpe.name, bpe.vocab_size, bpe.eod_id)
    assert same(again.encode_batch(texts), ids)


def test_trained_bpe_is_deterministic(bpe, texts):
    assert same(tk.train_bpe(texts, 320).encode_batch(texts), bpe.encode_batch(texts))


def test_special_token_text_is_not_an_eod(bpe):
    ids = bpe.encode("a <|endoftext|> b")
    assert bpe.eod_id not in ids and bpe.decode(ids) == "a <|endoftext|> b"
    assert bpe.eod_id not in pickle.loads(pickle.dumps(bpe)).encode("<|endoftext|>")


def test_too_small_bpe_vocab(texts):
    with pytest.raises(UserError, match="at least 257") as err:
        tk.train_bpe(texts, 256)
    one_line(err)


def test_huggingface_file_and_folder(bpe, texts, tmp_path):
    bpe.save(tmp_path)
    for spec in (tmp_path / "tokenizer.json", tmp_path):
        tok = tk.load(str(spec))
        assert tok.kind == "huggingface" and tok.name == str((tmp_path / "tokenizer.json").resolve())
        assert same(tok.encode_batch(texts[:20]), bpe.encode_batch(texts[:20]))


def test_huggingface_bad_files(bpe, tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(UserError, match="cannot load") as err:
        tk.load(str(tmp_path))
    one_line(err)
    raw = json.loads(bpe._tok.to_str())
    raw["added_tokens"] = []
    raw["model"]["vocab"].pop("<|endoftext|>")
    (tmp_path / "tokenizer.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match="none of the end-of-document tokens") as err:
        tk.load(str(tmp_path / "tokenizer.json"))
    one_line(err)
    (tmp_path / "sub").mkdir()
    with pytest.raises(UserError, match="no tokenizer.json"):
        tk.load(str(tmp_path / "sub"))


def test_offline_names_are_refused(offline):
    for spec in ("gpt2", "meta-llama/Llama-3.1-8B"):
        with pytest.raises(UserError, match="prefix never downloads") as err:
            tk.load(spec)
        one_line(err)
    with pytest.raises(UserError, match="unknown encoding.*cl100k_base") as err:
        tk.load("tiktoken:no_such_encoding")
    one_line(err)
    assert offline == []


def test_uncached_tiktoken_is_refused_without_network(offline, tmp_path):
    start = time.monotonic()
    with pytest.raises(UserError, match="tiktoken:cl100k_base: .*tiktoken-cache.* never downloads") as err:
        tk.load("tiktoken:cl100k_base")
    one_line(err)
    assert isinstance(err.value.__cause__, tk._DownloadRefused)  # stopped by prefix's guard, before any fetch
    assert offline == [] and time.monotonic() - start < 5
    assert not (tmp_path / "tiktoken-cache").exists()


def write_ranks(path: Path) -> None:
    ranks = [bytes([b]) for b in range(256)] + [b"th", b"the", b"in", b" the"]
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for r, t in enumerate(ranks)))


def test_tiktoken_local_file(offline, tmp_path):
    write_ranks(tmp_path / "small.tiktoken")
    tok = tk.load(f"tiktoken:{tmp_path / 'small.tiktoken'}")
    assert (tok.kind, tok.eod_id, tok.vocab_size) == ("tiktoken", 260, 261)
    text = "the thin cat in the hat, naïve 🙂 <|endoftext|>"
    ids = tok.encode(text)
    assert 257 in ids and tok.eod_id not in ids and tok.decode(ids) == text
    assert tok.decode(np.concatenate([ids, [tok.eod_id], tok.encode("x")])) == text + "\n\nx"
    assert tok.decode([258, 9999]) == "in"  # ids the encoding lacks are skipped
    assert np.array_equal(pickle.loads(pickle.dumps(tok)).encode(text), ids)

    entry = save_dataset(tok, tmp_path / "data")
    assert entry["file"] == "tokenizer.tiktoken" and entry["special_tokens"] == {"<|endoftext|>": 260}
    (tmp_path / "small.tiktoken").unlink()
    again = tk.from_dataset(tmp_path / "data")
    assert np.array_equal(again.encode(text), ids) and again.eod_id == 260
    assert offline == [] and not (tmp_path / "tiktoken-cache").exists()


def test_tiktoken_bad_files(tmp_path):
    (tmp_path / "bad.tiktoken").write_text("not base64 at all\n")
    with pytest.raises(UserError, match="not a readable tiktoken rank file") as err:
        tk.load(f"tiktoken:{tmp_path / 'bad.tiktoken'}")
    one_line(err)
    with pytest.raises(UserError, match="no such file"):
        tk.load(f"tiktoken:{tmp_path / 'missing.tiktoken'}")


def test_from_dataset_without_tokenizer(tmp_path):
    assert tk.from_dataset(tmp_path) is None
    (tmp_path / "manifest.json").write_text(json.dumps({"vocab_size": 257}))
    assert tk.from_dataset(tmp_path) is None
    (tmp_path / "manifest.json").write_text(json.dumps({"tokenizer": "bytes"}))  # corpus.py's manifests
    assert tk.from_dataset(tmp_path).kind == "bytes"
    (tmp_path / "manifest.json").write_text(json.dumps({"tokenizer": {"kind": "huggingface", "name": "x",
                                                                      "file": "tokenizer.json"}}))
    with pytest.raises(UserError, match="cannot load"):
        tk.from_dataset(tmp_path)


def test_entry_that_disagrees_with_its_files(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"tokenizer": {"kind": "bytes", "vocab_size": 300}}))
    with pytest.raises(UserError, match="differ from the recorded") as err:
        tk.from_dataset(tmp_path)
    one_line(err)
    (tmp_path / "manifest.json").write_text(json.dumps({"tokenizer": {"kind": "sentencepiece"}}))
    with pytest.raises(UserError, match="not understood"):
        tk.from_dataset(tmp_path)
