"""`prefix data prepare` on Hugging Face datasets written by the real `datasets` library: `save_to_disk`
folders, Arrow files, and a dataset in a real local cache loaded by name, offline.

Each kind must give exactly the shards the same texts give as JSON lines (the `content_hash` covers
every shard byte), with the same bad records counted; loading by name must not make one request to
the Hub (a recording server stands in for it, at HF_ENDPOINT).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO
from test_prepare import read_split  # every sample's ids, read with streaming's own shard readers

from prefix.data.corpus import EOD, is_validation
from prefix.data.prepare import prepare

SEQ = 15
WORDS = ("alpha", "beta", "délta", "日本", "🙂", "x = 1", "\n", ",", '"')


def texts(n: int, seed: int) -> list[str | None]:
    """Documents, with a missing and an empty one among them (bad records every kind must count alike)."""
    rng = np.random.default_rng(seed)
    docs: list[str | None] = [f"doc {seed}.{i}: " + " ".join(rng.choice(WORDS, size=rng.integers(1, 20)))
                              for i in range(n)]
    docs[3], docs[7] = None, ""
    return docs


def write_jsonl(path: Path, docs: list[str | None]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    return path


TRAIN, TEST = texts(1500, 0), texts(60, 1)
FR_TRAIN, FR_TEST = texts(300, 2), texts(40, 3)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The same documents as JSON lines, saved with `save_to_disk`, as Arrow files, and in a local HF cache."""
    import pyarrow as pa

    datasets = pytest.importorskip("datasets")  # the `hf` extra

    root = tmp_path_factory.mktemp("hf")
    for name, docs in {"train": TRAIN, "test": TEST, "fr-train": FR_TRAIN, "fr-test": FR_TEST}.items():
        write_jsonl(root / f"{name}.jsonl", docs)
    train, test = (datasets.Dataset.from_dict({"id": list(range(len(t))), "text": t}) for t in (TRAIN, TEST))
    train.save_to_disk(root / "saved", num_shards=2)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(root / "dict")
    table = pa.table({"text": TRAIN})
    for name, new in (("stream.arrow", pa.ipc.new_stream), ("file.arrow", pa.ipc.new_file)):
        with new(root / name, table.schema) as writer:
            writer.write_table(table, max_chunksize=1100)  # two record batches, the first wider than a slice
    # A real cache: load a local dataset with two configs once, as a Hub download would. A Hub dataset's cache is
    # owner___name/CONFIG/VERSION/COMMIT/name-SPLIT.arrow, a local one's name/...: the rename makes it owner/tiny's.
    local = root / "tiny"
    local.mkdir()
    for lang, split, docs in (("en", "train", TRAIN), ("en", "test", TEST), ("fr", "train", FR_TRAIN),
                              ("fr", "test", FR_TEST)):
        write_jsonl(local / f"{lang}-{split}.jsonl", docs)
    (local / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {lang}\n  data_files:\n  - {{split: train, path: {lang}-train.jsonl}}\n"
        f"  - {{split: test, path: {lang}-test.jsonl}}\n" for lang in ("en", "fr")) + "---\n")
    for lang in ("en", "fr"):
        datasets.load_dataset(str(local), lang, cache_dir=str(root / "home" / "datasets"))
    (root / "home" / "datasets" / "tiny").rename(root / "home" / "datasets" / "owner___tiny")
    return root


@pytest.fixture(scope="module")
def hub():
    """A stand-in for the Hugging Face Hub on 127.0.0.1 that answers 404 and records every request."""
    requests: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            self.send_error(404)

        do_HEAD = do_POST = do_GET

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()
    server.server_close()


def cli(data: Path, hub, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(data / "home"), "HF_ENDPOINT": hub[0]}
    for offline in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_DATASETS_CACHE", "TRANSFORMERS_OFFLINE"):
        env.pop(offline, None)  # offline only because prepare makes it so
    return subprocess.run([sys.executable, "-m", "prefix.cli", "data", "prepare", *args], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=120)


@pytest.fixture(scope="module")
def as_jsonl(data, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("jsonl") / "out"
    return prepare([str(data / "train.jsonl")], out, val=[str(data / "test.jsonl")], seq_len=SEQ)


@pytest.mark.parametrize("train", ["saved", "dict", "stream.arrow", "file.arrow"])
def test_saved_folders_and_arrow_files_give_the_shards_of_the_same_jsonl(data, as_jsonl, tmp_path, monkeypatch,
                                                                         train):
    monkeypatch.setitem(sys.modules, "datasets", None)  # read with pyarrow alone: no `datasets` needed
    manifest = prepare([str(data / train)], tmp_path / "out", val=[str(data / "dict" / "test")], seq_len=SEQ)
    assert manifest["content_hash"] == as_jsonl["content_hash"] and manifest["documents"] == as_jsonl["documents"]
    assert manifest["bad_records"] == as_jsonl["bad_records"] == {"missing_field": 2, "undecodable": 0, "empty": 2}
    read = [Path(s["path"]).relative_to(data).as_posix() for s in manifest["sources"] if s["split"] == "train"]
    assert read == {"saved": ["saved/data-00000-of-00002.arrow", "saved/data-00001-of-00002.arrow"],
                    "dict": ["dict/train/data-00000-of-00001.arrow"]}.get(train, [train]), "a dict's train split"


def test_a_saved_folder_splits_by_record_identity(data, tmp_path):
    """Without --val, each record's identity (file in the folder, record number) decides its split."""
    manifest = prepare([str(data / "saved")], tmp_path / "out", seq_len=SEQ, val_fraction=0.2)
    numbered = [(f"data-0000{i // 750}-of-00002.arrow#{i % 750}", t) for i, t in enumerate(TRAIN) if t]
    val = [t for ident, t in numbered if is_validation(ident, 0.2)]
    ids = read_split(tmp_path / "out", "val")
    got = [bytes(p[:-1].astype(np.uint8)).decode() for p in np.split(ids, np.flatnonzero(ids == EOD) + 1)[:-1]]
    assert got == val[:len(got)] and len(got) > 200 and manifest["documents"]["val"] == len(val)


def test_a_dataset_in_the_local_cache_by_name_never_touches_the_hub(data, hub, tmp_path):
    fr = prepare([str(data / "fr-train.jsonl")], tmp_path / "jsonl", val=[str(data / "fr-test.jsonl")], seq_len=SEQ)
    result = cli(data, hub, "hf:owner/tiny:fr", "--val", "hf:owner/tiny:fr@test", "--out", str(tmp_path / "out"),
                 "--seq-len", str(SEQ))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["content_hash"] == fr["content_hash"] and manifest["bad_records"] == fr["bad_records"]
    assert [s["dataset"] for s in manifest["sources"]] == ["hf:owner/tiny:fr@train", "hf:owner/tiny:fr@test"]
    assert hub[1] == [], "offline: not one request to the Hub"


@pytest.mark.parametrize("spec, says", [
    ("hf:owner/absent", "hf:owner/absent: not in the local Hugging Face datasets cache ("),
    ("hf:owner/tiny", "configurations in the cache: en, fr; name a cached config: hf:owner/tiny:CONFIG"),
    ("hf:owner/tiny:en@validation", "no split 'validation' (splits: train, test); name one of them"),
])
def test_a_name_the_cache_cannot_give_is_one_line_and_writes_nothing(data, hub, tmp_path, spec, says):
    result = cli(data, hub, spec, "--out", str(tmp_path / "out"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert says in lines[0] and result.stdout == ""
    assert list(tmp_path.iterdir()) == [] and hub[1] == []
