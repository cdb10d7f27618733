"""The default corpus, byte-level packing, and streaming's import shim."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from helpers import REPO

from prefix.data.corpus import EOD, FORMAT, decode, encode, write_corpus, write_split


def test_streaming_imports_through_the_compat_module():
    result = subprocess.run([sys.executable, "-c",
                             "from prefix.data.compat import streaming, StreamingDataset, MDSWriter;"
                             "print(streaming.__version__)"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("0.13")


def test_byte_tokens_round_trip():
    text = "def f(x):\n    return 'héllo'\n"
    ids = encode(text)
    assert ids[-1] == EOD and len(ids) == len(text.encode()) + 1
    assert decode(ids[:-1]) == text


def test_split_writer_packs_documents_end_to_end(tmp_path):
    from prefix.data.compat import streaming

    reader_from_json = streaming.base.format.reader_from_json
    docs = [b"abc", b"defgh", b"ij"]
    assert write_split(docs, tmp_path / "s", seq_len=3) == 3
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    out = [s["tokens"] for shard in index["shards"] for s in reader_from_json(str(tmp_path), "s", shard)]
    stream = np.concatenate([encode(d) for d in docs])
    assert all(len(w) == 4 for w in out) and len(stream) - 12 == 1, "the 1-token tail is dropped"
    assert np.array_equal(np.concatenate(out), stream[:12])
    assert index["shards"][0]["hashes"] == ["sha1", "xxh64"]


def test_corpus_holds_out_whole_documents(tmp_path):
    docs = [(f"doc{i}.py", f"# document {i}\n".encode() * 20) for i in range(200)]
    manifest = write_corpus(docs, tmp_path / "c", seq_len=16, val_fraction=0.1, source="test")
    assert manifest["documents"]["train"] + manifest["documents"]["val"] == 200
    assert 0 < manifest["documents"]["val"] < 60
    assert manifest["format"] == FORMAT and manifest["vocab_size"] == 257 and manifest["tokenizer"]["kind"] == "bytes"
    assert all(manifest["samples"][s] * 17 + manifest["dropped_tokens"][s] == manifest["tokens"][s]
               for s in ("train", "val"))
    assert json.loads((tmp_path / "c" / "manifest.json").read_text()) == manifest
    assert (tmp_path / "c" / "train" / "index.json").is_file() and (tmp_path / "c" / "val" / "index.json").is_file()


def test_default_corpus_is_built_once_by_ranks_starting_together(tmp_path):
    code = ("import sys; from pathlib import Path; from prefix.data.corpus import ensure_default_corpus;"
            "p, built = ensure_default_corpus(Path(sys.argv[1]), 48, 0.02); print(p, built)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True, cwd=REPO) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outputs[0][0] == outputs[1][0]
    assert sorted(o[1] for o in outputs) == ["False", "True"], "exactly one process built it"
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [outputs[0][0].split("/")[-1]]
