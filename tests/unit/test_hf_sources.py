"""Finding and reading Hugging Face inputs in-process: saved folders, Arrow files, `hf:` names and their refusals."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from prefix.data import hf_sources
from prefix.data.sources import BATCH_ROWS, BadRecords, check_columns, find_sources, read_documents
from prefix.errors import UserError


def write_arrow(path: Path, columns: dict, stream: bool = True, batch_rows: int | None = None) -> Path:
    table = pa.table(columns)
    with (pa.ipc.new_stream if stream else pa.ipc.new_file)(path, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=batch_rows):
            writer.write_batch(batch)
    return path


def saved(folder: Path, files: list[str]) -> Path:
    """What `Dataset.save_to_disk` leaves, written by hand: the data files it lists and its two metadata files."""
    folder.mkdir(parents=True)
    for name in files:
        write_arrow(folder / name, {"text": [f"{folder.name} {name}"]})
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": f} for f in files]}))
    (folder / "dataset_info.json").write_text("{}")
    return folder


@pytest.mark.parametrize("stream", [True, False], ids=["ipc-stream", "ipc-file"])
def test_arrow_files_are_read_in_slices_with_bad_records_counted(tmp_path, stream):
    texts = [f"doc {i}" for i in range(BATCH_ROWS + 300)]  # one record batch wider than a slice
    values = [t.encode() for t in texts] + [b"\xff\xfe", b"", None]
    path = write_arrow(tmp_path / "d.arrow", {"id": list(range(len(values))), "text": values}, stream)
    bad = BadRecords()
    docs = list(read_documents(find_sources([str(path)])[0], "text", bad))
    assert docs == [(f"d.arrow#{i}", t) for i, t in enumerate(texts)]
    assert (bad.undecodable, bad.empty, bad.missing_field) == (1, 1, 1)
    with pytest.raises(UserError, match=r"d.arrow: no column 'body' \(columns: id, text\); .*--text-field"):
        check_columns(find_sources([str(path)])[0], "body")


def test_a_broken_arrow_file_is_one_line(tmp_path):
    (tmp_path / "x.arrow").write_bytes(b"ARROW1 but nothing after")
    with pytest.raises(UserError, match=r"x.arrow: not a readable Arrow file \(.*\); replace or leave it out"):
        check_columns(find_sources([str(tmp_path / "x.arrow")])[0], "text")


def test_saved_folders_give_their_data_files_and_a_dict_its_train_split(tmp_path):
    one = saved(tmp_path / "one", ["data-00001-of-00002.arrow", "data-00000-of-00002.arrow"])
    assert hf_sources.saved_dataset_files(one) == [one / "data-00001-of-00002.arrow", one / "data-00000-of-00002.arrow"]
    d = tmp_path / "dict"
    for split in ("test", "train"):
        saved(d / split, ["data-00000-of-00001.arrow"])
    (d / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert hf_sources.saved_dataset_files(d) == [d / "train" / "data-00000-of-00001.arrow"]
    # inside a folder: only the data files, never the metadata JSON or a dict's other splits
    names = [s.name for s in find_sources([str(tmp_path)])]
    assert names == ["dict/train/data-00000-of-00001.arrow", "one/data-00001-of-00002.arrow",
                     "one/data-00000-of-00002.arrow"]


def test_saved_folder_refusals(tmp_path):
    d = tmp_path / "dict"
    for split in ("test", "validation"):
        saved(d / split, ["data-00000-of-00001.arrow"])
    (d / "dataset_dict.json").write_text(json.dumps({"splits": ["test", "validation"]}))
    with pytest.raises(UserError, match=rf"has splits test, validation and no 'train'; .*: {d / 'test'}$"):
        find_sources([str(d)])
    assert [s.name for s in find_sources([str(d / "validation")])] == ["data-00000-of-00001.arrow"]
    (d / "dataset_dict.json").write_text(json.dumps({"splits": ["test"]}))
    assert [s.path for s in find_sources([str(d)])] == [d / "test" / "data-00000-of-00001.arrow"], "the only split"
    broken = saved(tmp_path / "broken", ["data-00000-of-00001.arrow"])
    (broken / "state.json").write_text("{not json")
    with pytest.raises(UserError, match="state.json: not readable as the JSON datasets writes .*; save the dataset"):
        find_sources([str(broken)])
    cache = tmp_path / "cache"  # what load_dataset leaves: NAME-SPLIT.arrow files and dataset_info.json
    cache.mkdir()
    write_arrow(cache / "tiny-train.arrow", {"text": ["a"]})
    (cache / "dataset_info.json").write_text("{}")
    with pytest.raises(UserError, match=r"a Hugging Face datasets cache folder, .*by name \(hf:NAME"):
        find_sources([str(cache)])


@pytest.mark.parametrize("spec", ["hf:", "hf:a/b/c", "hf:/x", "hf:owner/", "hf:x:", "hf:x@", "hf:x:@y"])
def test_malformed_names_are_refused_before_loading(spec):
    with pytest.raises(UserError, match=r"not a dataset name; write hf:NAME\[:CONFIG\]\[@SPLIT\]"):
        hf_sources.cached_dataset(spec)


def test_a_name_without_the_datasets_library_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # what `import datasets` meets when it is not installed
    with pytest.raises(UserError, match=r"hf:owner/name: .*needs the datasets library; pip install 'prefix-train\[hf\]'"):
        find_sources(["hf:owner/name"])


def test_a_local_folder_with_the_name_is_refused_not_read_instead(tmp_path, monkeypatch):
    pytest.importorskip("datasets")  # the `hf` extra
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "name").mkdir(parents=True)  # load_dataset("owner/name") would read it, not the cache
    with pytest.raises(UserError, match=r"hf:owner/name: ./owner/name is a folder here, .*run from another folder"):
        find_sources(["hf:owner/name"])
