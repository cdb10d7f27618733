"""`prefix data prepare` end to end: real input files, real MDS shards read back, the real CLI."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from helpers import REPO

from prefix.data import tokenizers
from prefix.data.corpus import EOD, encode, is_validation
from prefix.data.prepare import prepare
from prefix.errors import UserError

SEQ = 15
WORDS = ("alpha", "beta", "gamma", "délta", "日本", "🙂", "x = 1", "\n", "\t", ",", '"', "'")


def texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"doc {i}: " + " ".join(rng.choice(WORDS, size=rng.integers(1, 25))) for i in range(n)]


def read_split(root: Path, split: str) -> np.ndarray:
    """Every sample's ids in order, read with streaming's own MDS shard readers."""
    from prefix.data.compat import streaming

    reader_from_json = streaming.base.format.reader_from_json
    index = json.loads((root / split / "index.json").read_text())
    rows = [s["tokens"] for shard in index["shards"] for s in reader_from_json(str(root), split, shard)]
    assert all(len(r) == SEQ + 1 for r in rows)
    return np.concatenate(rows).astype(np.int64)


def read_streaming(root: Path, split: str) -> np.ndarray:
    """The same through StreamingDataset, with shard hashes validated."""
    from prefix.data.compat import StreamingDataset

    ds = StreamingDataset(local=str(root / split), shuffle=False, batch_size=1, validate_hash="xxh64")
    try:
        return np.concatenate([np.asarray(ds[i]["tokens"], dtype=np.int64) for i in range(len(ds))])
    finally:
        del ds


def check_documents(root: Path, manifest: dict, docs: list[tuple[str, str]], fraction: float,
                    held_out: set[str] = frozenset(), read=read_split) -> None:
    """Each split's ids are its documents (in order, each + EOD) up to the dropped tail, exactly."""
    for split in ("train", "val"):
        chosen = [text for ident, text in docs if (ident.split("#")[0] in held_out if held_out
                                                   else is_validation(ident, fraction)) == (split == "val")]
        expected = np.concatenate([encode(t) for t in chosen]).astype(np.int64)
        got = read(root, split)
        assert len(got) == manifest["samples"][split] * (SEQ + 1)
        assert len(expected) - len(got) == manifest["dropped_tokens"][split] <= SEQ, "only the tail is dropped"
        assert np.array_equal(got, expected[:len(got)])
        pieces = np.split(got, np.flatnonzero(got == EOD) + 1)[:-1]  # the last piece was cut by the drop
        assert [bytes(p[:-1].astype(np.uint8)).decode() for p in pieces] == chosen[:len(pieces)]
        assert manifest["documents"][split] == len(chosen) and manifest["tokens"][split] == len(expected)


def write_jsonl(path: Path, docs: list[str]) -> list[tuple[str, str]]:
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(docs)))
    return [(f"{path.name}#{i}", t) for i, t in enumerate(docs)]


def write_json(path: Path, docs: list[str]) -> list[tuple[str, str]]:
    path.write_text(json.dumps([{"text": t} for t in docs]))
    return [(f"{path.name}#{i}", t) for i, t in enumerate(docs)]


def write_csv(path: Path, docs: list[str]) -> list[tuple[str, str]]:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerows([i, t] for i, t in enumerate(docs))
    return [(f"{path.name}#{i}", t) for i, t in enumerate(docs)]


def write_parquet(path: Path, docs: list[str]) -> list[tuple[str, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path, row_group_size=700)
    return [(f"{path.name}#{i}", t) for i, t in enumerate(docs)]


@pytest.mark.parametrize("write", [write_jsonl, write_json, write_csv, write_parquet])
def test_record_formats_round_trip(tmp_path, write):
    suffix = write.__name__.removeprefix("write_")
    docs = write(tmp_path / f"data.{suffix}", texts(2500 if suffix == "parquet" else 300))  # parquet: 3 batches
    manifest = prepare([str(tmp_path / f"data.{suffix}")], tmp_path / "out", seq_len=SEQ, val_fraction=0.2)
    check_documents(tmp_path / "out", manifest, docs, 0.2)
    assert manifest["sources"] == [{"path": str(tmp_path / f"data.{suffix}"), "format": suffix,
                                    "split": "train+val"}]


def test_json_lines_in_a_json_file(tmp_path):
    docs = [(f"d.json#{i}", t) for i, t in enumerate(texts(200))]
    (tmp_path / "d.json").write_text("".join(json.dumps({"text": t}) + "\n" for _, t in docs))
    check_documents(tmp_path / "out", prepare([str(tmp_path / "d.json")], tmp_path / "out", seq_len=SEQ,
                                              val_fraction=0.2), docs, 0.2)


def txt_tree(root: Path, n: int = 60) -> list[tuple[str, str]]:
    docs = []
    for i, text in enumerate(texts(n, seed=1)):
        name = f"part{i % 3}/doc{i:03}.txt"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
        docs.append((name, text))
    (root / "README.md").write_text("not an input: unsupported extensions are skipped in folders")
    return sorted(docs)


def test_folder_round_trip_through_streaming_dataset(tmp_path):
    docs = txt_tree(tmp_path / "corpus")
    manifest = prepare([str(tmp_path / "corpus")], tmp_path / "out", seq_len=SEQ, val_fraction=0.3)
    check_documents(tmp_path / "out", manifest, docs, 0.3, read=read_streaming)
    assert manifest["tokenizer"]["kind"] == "bytes" and manifest["token_dtype"] == "uint16"
    assert tokenizers.from_dataset(tmp_path / "out").decode(encode("héllo")[:-1]) == "héllo"


def test_glob_and_single_files_with_a_validation_input(tmp_path):
    docs = txt_tree(tmp_path / "corpus")
    pattern = str(tmp_path / "corpus" / "**" / "*.txt")  # identities are relative to "corpus", as for the folder
    (tmp_path / "val.txt").write_text("the held-out document\n")
    manifest = prepare([pattern], tmp_path / "out", val=[str(tmp_path / "val.txt")], seq_len=SEQ)
    check_documents(tmp_path / "out", manifest, [*docs, ("val.txt", "the held-out document\n")], 0,
                    held_out={"val.txt"})
    assert {s["split"] for s in manifest["sources"]} == {"train", "val"}
    moved = prepare([str(tmp_path / "corpus")], tmp_path / "moved", seq_len=SEQ, val_fraction=0.3)
    assert prepare([pattern], tmp_path / "again", seq_len=SEQ, val_fraction=0.3)["content_hash"] == \
        moved["content_hash"], "a glob and its folder split alike"


@pytest.mark.parametrize("kind", ["bin-uint16", "bin-uint32", "npy"])
def test_token_arrays_pass_through(tmp_path, kind):
    rng = np.random.default_rng(0)
    dtype = np.uint32 if kind == "bin-uint32" else np.uint16
    ids = rng.integers(0, 100_000 if dtype == np.uint32 else 50_257, size=5000).astype(dtype)
    path = tmp_path / ("train.npy" if kind == "npy" else "train.bin")
    np.save(path, ids.astype(np.int64)) if kind == "npy" else ids.tofile(path)
    manifest = prepare([str(path)], tmp_path / "out", seq_len=SEQ, val_fraction=0.1, bin_dtype=str(np.dtype(dtype)))
    cut = 5000 - 500
    for split, part in (("train", ids[:cut]), ("val", ids[cut:])):
        got = read_split(tmp_path / "out", split)
        assert np.array_equal(got, part[:len(got)]) and len(part) - len(got) == manifest["dropped_tokens"][split]
    assert manifest["vocab_size"] == int(ids.max()) + 1 and manifest["tokenizer"] == {"kind": "pretokenized"}
    assert manifest["token_dtype"] == ("uint32" if ids.max() >= 1 << 16 else "uint16")


def test_nanogpt_train_and_val_bins(tmp_path):
    train, val = (np.arange(n, dtype=np.uint16) % 50_000 for n in (3000, 400))
    train.tofile(tmp_path / "train.bin")
    val.tofile(tmp_path / "val.bin")
    manifest = prepare([str(tmp_path / "train.bin")], tmp_path / "out", val=[str(tmp_path / "val.bin")],
                       seq_len=SEQ, vocab_size=50_304)
    assert np.array_equal(read_split(tmp_path / "out", "train"), train[:3000 // (SEQ + 1) * (SEQ + 1)])
    assert np.array_equal(read_split(tmp_path / "out", "val"), val[:400 // (SEQ + 1) * (SEQ + 1)])
    assert manifest["vocab_size"] == 50_304 and manifest["documents"] == {"train": 1, "val": 1}
    with pytest.raises(UserError, match="cannot be prepared together"):
        prepare([str(tmp_path / "train.bin"), str(tmp_path / "out" / "manifest.json")], tmp_path / "o2")
    with pytest.raises(UserError, match="do not fit a vocabulary of 100"):
        prepare([str(tmp_path / "train.bin")], tmp_path / "o3", vocab_size=100)
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        prepare([str(tmp_path / "train.bin")], tmp_path / "out", seq_len=SEQ)
    replaced = prepare([str(tmp_path / "train.bin")], tmp_path / "out", seq_len=SEQ, val_fraction=0.5, overwrite=True)
    assert replaced["documents"] == {"train": 1, "val": 1} and replaced["tokens"]["val"] == 1500
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "train.bin", "val.bin"]


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bpe")
    tokenizers.train_bpe(texts(500), 400).save(folder)
    return folder / "tokenizer.json"


def test_bpe_round_trip_and_any_worker_count_gives_the_same_shards(tmp_path, bpe_file):
    docs = write_jsonl(tmp_path / "d.jsonl", texts(1200, seed=3))
    one = prepare([str(tmp_path / "d.jsonl")], tmp_path / "w1", tokenizer=str(bpe_file), seq_len=SEQ,
                  val_fraction=0.1, workers=1)
    two = prepare([str(tmp_path / "d.jsonl")], tmp_path / "w2", tokenizer=str(bpe_file), seq_len=SEQ,
                  val_fraction=0.1, workers=2)
    assert one == two and one["tokenizer"]["kind"] == "huggingface"
    tok = tokenizers.from_dataset(tmp_path / "w2")
    assert (tmp_path / "w2" / "tokenizer.json").is_file() and tok.vocab_size == one["vocab_size"]
    ids = read_split(tmp_path / "w2", "train")
    pieces = np.split(ids, np.flatnonzero(ids == tok.eod_id) + 1)[:-1]
    train = [t for ident, t in docs if not is_validation(ident, 0.1)]
    assert [tok.decode(p[:-1]) for p in pieces] == train[:len(pieces)] and len(pieces) > 100


def test_token_arrays_can_record_their_tokenizer(tmp_path, bpe_file):
    np.random.default_rng(1).integers(0, 400, size=2000).astype(np.uint16).tofile(tmp_path / "t.bin")
    manifest = prepare([str(tmp_path / "t.bin")], tmp_path / "out", tokenizer=str(bpe_file), seq_len=SEQ)
    assert manifest["tokenizer"]["pretokenized"] and manifest["vocab_size"] == 400
    assert tokenizers.from_dataset(tmp_path / "out").vocab_size == 400
    (tmp_path / "big.bin").write_bytes(np.array([400], dtype=np.uint16).tobytes() * 100)
    with pytest.raises(UserError, match="ids from 400 to 400 do not fit a vocabulary of 400"):
        prepare([str(tmp_path / "big.bin")], tmp_path / "o2", tokenizer=str(bpe_file))


def test_bad_records_are_counted_and_skipped(tmp_path):
    good = texts(40)
    lines = [json.dumps({"text": t}) for t in good]
    lines[5:5] = ['{"title": "no text field"}', '{"text": "unterminated', '{"text": ""}', '{"text": 7}',
                  '{"text": "\\ud800 lone surrogate"}']
    (tmp_path / "d.jsonl").write_bytes("\n".join(lines).encode() + b'\n{"text": "\xff\xfe"}\n')
    (tmp_path / "bad.txt").write_bytes(b"latin-1 \xe9t\xe9")
    manifest = prepare([str(tmp_path / "d.jsonl"), str(tmp_path / "bad.txt")], tmp_path / "out",
                       seq_len=SEQ, val_fraction=0.2)
    assert manifest["bad_records"] == {"missing_field": 2, "undecodable": 4, "empty": 1}
    assert sum(manifest["documents"].values()) == 40
    with pytest.raises(UserError, match=r"no record has a string field 'body' \(fields seen: text, title\); .*--text-field"):
        prepare([str(tmp_path / "d.jsonl")], tmp_path / "o2", text_field="body")
    assert not (tmp_path / "o2").exists() and not list(tmp_path.glob(".o2.tmp-*"))


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefix.cli", "data", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)


@pytest.mark.parametrize("case", ["missing file", "glob matching nothing", "wrong --text-field",
                                  "corrupt parquet", "existing --out", "bad --shard-size", "unsupported file"])
def test_cli_refuses_with_one_line(tmp_path, case):
    write_jsonl(tmp_path / "d.jsonl", texts(50))
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet")
    (tmp_path / "notes.docx").write_bytes(b"?")
    (tmp_path / "exists").mkdir()
    out = tmp_path / ("exists" if case == "existing --out" else "out")
    args = {"missing file": [str(tmp_path / "nope.jsonl")], "glob matching nothing": [str(tmp_path / "*.txt")],
            "wrong --text-field": [str(tmp_path / "d.jsonl"), "--text-field", "body"],
            "corrupt parquet": [str(tmp_path / "corrupt.parquet")], "existing --out": [str(tmp_path / "d.jsonl")],
            "bad --shard-size": [str(tmp_path / "d.jsonl"), "--shard-size", "lots"],
            "unsupported file": [str(tmp_path / "notes.docx")]}[case]
    result = cli("prepare", *args, "--out", str(out))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert out.exists() == (case == "existing --out") and not list(tmp_path.glob(".*.tmp-*"))
    if case == "existing --out":
        assert not list(out.iterdir()), "left alone"


def test_interrupted_prepare_leaves_no_output_and_a_rerun_cleans_up(tmp_path):
    write_jsonl(tmp_path / "big.jsonl", ["lorem ipsum dolor sit amet " * 40] * 6000)  # ~6.5 MB
    args = ["prepare", str(tmp_path / "big.jsonl"), "--out", str(tmp_path / "out"), "--seq-len", "64"]
    proc = subprocess.Popen([sys.executable, "-m", "prefix.cli", "data", *args, "--shard-size", "2kb",
                             "--workers", "2"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.tmp-*/train/shard.00002.mds")) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert proc.poll() is None, "finished before it could be killed: give it more input"
    workers = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out").exists() and len(list(tmp_path.glob(".out.tmp-*"))) == 1
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, "tokenizer workers exit with their parent"
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"prepared {tmp_path / 'out'}") and "tokens/s" in result.stdout
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["samples"]["train"] > 0
    assert not list(tmp_path.glob(".out.tmp-*")), "the killed run's temporary folder was removed"


def test_train_tokenizer_cli_makes_a_tokenizer_prepare_uses(tmp_path):
    docs = write_csv(tmp_path / "d.csv", texts(300))
    result = cli("train-tokenizer", str(tmp_path / "d.csv"), "--vocab-size", "300", "--out", str(tmp_path / "tok"))
    assert result.returncode == 0, result.stderr
    assert f"--tokenizer {tmp_path / 'tok' / 'tokenizer.json'}" in result.stdout
    manifest = prepare([str(tmp_path / "d.csv")], tmp_path / "out", tokenizer=str(tmp_path / "tok" / "tokenizer.json"),
                       seq_len=SEQ, val_fraction=0.2)
    assert manifest["vocab_size"] == 300 and manifest["tokens"]["train"] < sum(len(t.encode()) for _, t in docs)
    tok = tokenizers.from_dataset(tmp_path / "out")
    ids = read_split(tmp_path / "out", "val")
    first = ids[:np.flatnonzero(ids == tok.eod_id)[0]]
    assert tok.decode(first) == next(t for ident, t in docs if is_validation(ident, 0.2))


def test_a_prepared_dataset_trains_and_samples_with_its_own_tokenizer(tmp_path, bpe_file):
    """prepare → train: the manifest's vocabulary is enforced and the saved tokenizer decodes the sample."""
    from helpers import assert_clean_exit_2, run, train_cmd

    write_jsonl(tmp_path / "d.jsonl", texts(600, seed=5))
    manifest = prepare([str(tmp_path / "d.jsonl")], tmp_path / "ds", tokenizer=str(bpe_file), seq_len=32,
                       val_fraction=0.1)
    settings = (f"data.local={tmp_path / 'ds'}", "model.seq_len=32", "trainer.max_steps=4",
                "trainer.eval_every=2", "trainer.sample_tokens=20", "trainer.sample_prompt=doc 1")
    refused = run(train_cmd(0, "small", tmp_path / "runs", *settings))
    assert_clean_exit_2(refused, f"model.vocab_size: 257 cannot hold the token ids of data.local (its tokenizer "
                                 f"needs {manifest['vocab_size']})")
    trained = run(train_cmd(0, "fits", tmp_path / "runs", *settings, f"model.vocab_size={manifest['vocab_size']}"))
    assert trained.returncode == 0, trained.stderr[-3000:]
    sample = trained.stdout.split("--- sample from the trained model ---\n")[1].split("\n---")[0]
    assert sample.startswith("doc 1") and len(sample) > len("doc 1")
