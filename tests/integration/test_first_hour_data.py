"""What a new user meets in the first hour with their own data: each mistake is named, with its fix.

- a model.seq_len shorter than the prepared samples: a warning, once, with the numbers;
- `prefix data prepare` on a few small files: the empty split names --val-fraction / --val / --seq-len;
- a --text-field most records lack: an error naming the field, the file, the count and the fields they have.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, read_jsonl, run, train_cmd

from prefix.data.prepare import prepare
from prefix.errors import UserError

CROP = "trains on the first"
"""A fragment of the cropping warning (and of nothing else)."""


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefix.cli", "data", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def assert_one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


# 1. model.seq_len shorter than the dataset's samples.

@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """A dataset prepared with --seq-len 128: samples of 129 ids."""
    root = tmp_path_factory.mktemp("wide")
    write_jsonl(root / "d.jsonl", [{"text": f"doc {i}: " + "lorem ipsum dolor sit amet " * (i % 7 + 1)}
                                   for i in range(400)])
    prepare([str(root / "d.jsonl")], root / "ds", seq_len=128, val_fraction=0.1)
    return root / "ds"


def test_a_model_seq_len_shorter_than_the_samples_warns_once_with_the_numbers(wide, tmp_path):
    result = run(train_cmd(2, "cropped", tmp_path, f"data.local={wide}", "model.seq_len=64",
                           "trainer.max_steps=2", "trainer.eval_every=1"))
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if CROP in line]
    assert len(warnings) == 1, result.stderr[-3000:]  # rank 0 only, not again for the val split
    assert ("data.local: samples hold 129 token ids but model.seq_len=64 trains on the first 65 of each and "
            "drops 64") in warnings[0]
    assert "model.seq_len=128" in warnings[0] and "--seq-len 64" in warnings[0]
    logged = [e for e in read_jsonl(tmp_path / "cropped" / "logs" / "rank0.jsonl") if CROP in e["event"]]
    assert [(e["sample_tokens"], e["used_tokens"], e["dropped_tokens"]) for e in logged] == [(129, 65, 64)]


@pytest.mark.parametrize("data", ["prepared with the model's seq_len", "default corpus"])
def test_a_matching_seq_len_does_not_warn(data, wide, tmp_path):
    settings = [f"data.local={wide}", "model.seq_len=128"] if data.startswith("prepared") else []
    result = run(train_cmd(0, "fits", tmp_path, *settings, "trainer.max_steps=2", "trainer.eval_every=1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert CROP not in result.stderr and "[warning" not in result.stderr, result.stderr[-3000:]


# 2. Splits without one full sample.

def small_files(folder: Path, n: int = 3, size: int = 600) -> Path:
    folder.mkdir()
    for i in range(n):
        (folder / f"f{i}.txt").write_text(f"file {i} " + "x" * size)
    return folder


def test_prepare_on_a_few_small_files_names_the_val_split_fix(tmp_path):
    folder = small_files(tmp_path / "in")
    line = assert_one_error_line(cli("prepare", str(folder), "--out", str(tmp_path / "out")),
                                 "the val split got no documents", "--val-fraction 0.01 held out none of the 3 "
                                 "documents", "--val FILE")
    assert not (tmp_path / "out").exists()
    suggested = float(line.split("raise --val-fraction to ")[1].split()[0])
    manifest = prepare([str(folder)], tmp_path / "out", val_fraction=suggested)  # the number given works
    assert manifest["documents"]["val"] >= 1 and manifest["samples"]["val"] >= 1


def test_too_small_splits_name_the_options_with_the_numbers(tmp_path):
    folder = small_files(tmp_path / "in")  # 3 documents of 607 bytes: 608 ids each with end-of-document
    files = sorted(str(p) for p in folder.iterdir())
    with pytest.raises(UserError, match=r"the val split \(the --val inputs\) holds 608 tokens in 1 document\(s\), "
                                        r"fewer than one sample of --seq-len 1000 \+ 1 = 1001; pass more "
                                        r"validation data with --val or lower --seq-len to 607 or less"):
        prepare(files[:2], tmp_path / "o1", val=files[2:], seq_len=1000)
    with pytest.raises(UserError, match=r"the train split holds 608 tokens in 1 document\(s\), fewer than one "
                                        r"sample of --seq-len 1000 \+ 1 = 1001; add training data or lower "
                                        r"--seq-len to 607 or less"):
        prepare(files[:1], tmp_path / "o2", val=files[1:], seq_len=1000)
    with pytest.raises(UserError, match=r"the train split holds 608 tokens in 1 document\(s\), .*; add training "
                                        r"data, lower --val-fraction \(now 0.85\) or lower --seq-len to 607"):
        prepare([str(folder)], tmp_path / "o3", val_fraction=0.85, seq_len=1000)  # holds out 2 of the 3
    np.arange(1000, dtype=np.uint16).tofile(tmp_path / "ids.bin")
    with pytest.raises(UserError, match=r"the val split got 10 tokens \(the last 0.01 of each token array's ids, "
                                        r"1000 ids in all\), fewer than one sample of --seq-len 256 \+ 1 = 257; "
                                        r"raise --val-fraction to 0.257 or more, name validation files with "
                                        r"--val FILE or lower --seq-len to 9 or less"):
        prepare([str(tmp_path / "ids.bin")], tmp_path / "o4")
    assert prepare([str(tmp_path / "ids.bin")], tmp_path / "o5", val_fraction=0.257)["samples"]["val"] == 1
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith((".o", "o1", "o2", "o3", "o4"))]


# 3. A --text-field most records lack.

def test_a_text_field_most_records_lack_is_named(tmp_path):
    records = [{"id": i, "text": f"note {i} " * 20} for i in range(30)] + \
              [{"id": i, "content": f"def f{i}(): pass\n" * 5} for i in range(30, 100)]
    write_jsonl(tmp_path / "code.jsonl", records)
    result = cli("prepare", str(tmp_path / "code.jsonl"), "--out", str(tmp_path / "out"), "--seq-len", "15",
                 "--val-fraction", "0.2")  # enough 'text' records for both splits: it used to succeed
    assert_one_error_line(result, f"{tmp_path / 'code.jsonl'}: 70 of 100 records have no string field 'text' "
                                  "(their fields: id, content); name the text field with --text-field")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
    manifest = prepare([str(tmp_path / "code.jsonl")], tmp_path / "fixed", text_field="content", seq_len=15,
                       val_fraction=0.2)
    assert manifest["bad_records"]["missing_field"] == 30, "the fix: the other field; the rest only counted"


def test_a_few_records_without_the_field_are_only_counted(tmp_path):
    records = [{"text": f"document {i} " * 10} for i in range(6)] + [{"body": "elsewhere"}] * 4
    write_jsonl(tmp_path / "d.jsonl", records)
    manifest = prepare([str(tmp_path / "d.jsonl")], tmp_path / "out", seq_len=15, val_fraction=0.3)
    assert manifest["bad_records"]["missing_field"] == 4 and sum(manifest["documents"].values()) == 6
