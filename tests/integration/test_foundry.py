"""Training directly on MDS datasets written by other tools (llm-foundry's converters) and on bad ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import assert_clean_exit_2, losses, run, train_cmd
from mds import dataset, rows, write_split

from prefix.config import load
from prefix.data.streams import Source

QUICK = ("trainer.max_steps=6", "trainer.eval_every=3", "checkpoint.every_steps=0")


@pytest.mark.parametrize("encoding", ["bytes", "ndarray:int32", "ndarray:int64:80", "ndarray:uint16"])
def test_trains_on_llm_foundry_encodings(tmp_path: Path, encoding: str) -> None:
    """`bytes` is llm-foundry's int64 layout; samples longer than seq_len + 1 (80 > 65) are cropped."""
    data = dataset(tmp_path / "data", train=64, width=80, encoding=encoding, manifest=False)
    result = run(train_cmd(0, "r", tmp_path / "runs", f"data.local={data}", *QUICK))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(losses(tmp_path / "runs" / "r")) == list(range(1, 7))


def test_bytes_tokens_decode_to_the_ids_written(tmp_path: Path) -> None:
    from prefix.data.loader import IndexedDataset

    written = rows(12, 70, vocab=50_000, seed=3)
    write_split(tmp_path / "train", written, encoding="bytes")
    cfg = load(None, [f"data.local={tmp_path}"])
    ds = IndexedDataset(streams=[Source("data.local", tmp_path).stream("train")], batch_size=1, shuffle=False,
                        num_canonical_nodes=cfg.data.num_canonical_nodes)
    assert all(np.array_equal(ds[i]["tokens"], written[i]) for i in range(12))


@pytest.mark.parametrize(("columns", "fragment"), [
    ({"text": "str"}, "has no 'tokens' column (columns: text)"),
    ({"tokens": "str"}, "stores 'tokens' as str, not token ids"),
])
def test_datasets_without_token_ids_are_refused(tmp_path: Path, columns: dict, fragment: str) -> None:
    from prefix.data.compat import MDSWriter

    for split in ("train", "val"):
        with MDSWriter(out=str(tmp_path / "data" / split), columns=columns) as writer:
            for i in range(40):
                writer.write({name: f"document {i} " * 10 for name in columns})
    result = run(train_cmd(0, "r", tmp_path / "runs", f"data.local={tmp_path / 'data'}", *QUICK))
    assert_clean_exit_2(result, fragment)
    assert not (tmp_path / "runs" / "r").exists()


def test_token_ids_beyond_the_model_vocabulary_stop_the_run(tmp_path: Path) -> None:
    """No manifest says the vocabulary, so the loader checks each batch before the model sees it."""
    data = dataset(tmp_path / "data", train=64, vocab=1000, manifest=False, encoding="bytes")
    result = run(train_cmd(0, "r", tmp_path / "runs", f"data.local={data}", *QUICK))
    assert_clean_exit_2(result, "outside model.vocab_size=257; set model.vocab_size to at least")
