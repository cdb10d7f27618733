"""Finding `prefix data prepare`'s inputs and reading documents or token arrays out of each format.

A path that cannot be read at all is a `UserError` raised before any output exists; a single bad
record (missing field, undecodable, empty) is only counted, so one broken line among millions
never costs a run. Readers stream: JSON lines line by line, parquet and Arrow in record batches,
token arrays as memory maps. Every document carries an identity (its path relative to the input
it was found under, plus its record number) so the train/val split does not depend on where the
data happens to live. Hugging Face datasets (saved folders, the cache by name) are found in
`hf_sources.py` and read here as the Arrow files they are.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prefix.data import hf_sources
from prefix.errors import UserError

TEXT_FORMATS = ("txt", "jsonl", "json", "csv", "parquet", "arrow")
TOKEN_FORMATS = ("bin", "npy")
FORMATS = TEXT_FORMATS + TOKEN_FORMATS
BATCH_ROWS = 1024
"""Rows per parquet or Arrow record batch turned into Python strings: a bounded slice of a file at a time."""
_UNDECODABLE = object()


@dataclass(frozen=True)
class Source:
    path: Path
    name: str
    """Path relative to the input it was found under: the identity its records are split by."""
    format: str
    held_out: bool = False
    """Given with --val: all of it is validation data."""
    dataset: str | None = None
    """The `hf:NAME:CONFIG@SPLIT` a file of the Hugging Face cache belongs to."""

    @property
    def tokens(self) -> bool:
        return self.format in TOKEN_FORMATS


@dataclass
class BadRecords:
    """Records skipped, by reason. Counted, never fatal (except a text field most records of a source lack)."""

    missing_field: int = 0
    undecodable: int = 0
    empty: int = 0

    def total(self) -> int:
        return self.missing_field + self.undecodable + self.empty


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _expand(spec: str) -> tuple[Path, list[Path]]:
    """The base folder names are relative to, and the files of one input (file, folder, or glob)."""
    path = Path(spec).expanduser()
    if glob.has_magic(spec) and not path.exists():
        matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
        files = [p for p in matches if p.is_file()]
        if not files:
            raise UserError(f"{spec}: the pattern matches no file; check it (quote it so the shell "
                            "passes it on unexpanded)")
        first = next(i for i, part in enumerate(path.parts) if glob.has_magic(part))
        base = Path(*path.parts[:first]) if first else Path(".")
        return base, files
    if path.is_dir():
        files = list(_walk(path))
        if not files:
            raise UserError(f"{spec}: folder has no file ending in .{', .'.join(FORMATS)}; "
                            "point at the data files")
        return path, files
    if not path.exists():
        raise UserError(f"{spec}: no such file or folder; check the path")
    return path.parent, [path]


def _walk(folder: Path) -> Iterator[Path]:
    """Data files under a folder in path order, but a saved Hugging Face dataset's only. Hidden files and
    folders (.git, a prepare's temporary folder) are not data; links to folders are not followed."""
    saved = hf_sources.saved_dataset_files(folder)
    if saved is not None:
        yield from saved
        return
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and not entry.is_symlink():
            yield from _walk(entry)
        elif entry.is_file() and entry.suffix[1:].lower() in FORMATS:
            yield entry


def find_sources(inputs: Iterable[str], held_out: bool = False, exclude: Path | None = None) -> list[Source]:
    """Every file of the inputs but those under `exclude`, in a stable order, checked to be readable."""
    sources: list[Source] = []
    for spec in map(str, inputs):
        if hf_sources.is_hub_name(spec):
            named, dataset = hf_sources.cached_dataset(spec)
        else:
            base, files = _expand(spec)
            named, dataset = [(path, path.relative_to(base).as_posix()) for path in files], None
        for path, name in named:
            if exclude is not None and path.resolve().is_relative_to(exclude.resolve()):
                continue  # a dataset prepared earlier inside its own input folder
            fmt = path.suffix[1:].lower()
            if fmt not in FORMATS:
                raise UserError(f"{path}: unsupported file type {path.suffix or '(no extension)'}; "
                                f"use .{', .'.join(FORMATS)}")
            try:
                with open(path, "rb"):
                    pass
            except OSError as e:
                raise UserError(f"{path}: cannot read it ({e.strerror}); fix its permissions or "
                                "leave it out") from None
            sources.append(Source(path, name, fmt, held_out, dataset))
    return sources


def read_documents(source: Source, text_field: str, bad: BadRecords) -> Iterator[tuple[str, str]]:
    """(identity, text) of every good record of a text source; bad ones are counted in `bad`."""
    parsed, missing, seen = 0, 0, dict[str, None]()  # seen: fields of the records without a string text_field
    try:
        for number, record in enumerate(_records(source, text_field)):
            parsed += record is not _UNDECODABLE
            if isinstance(record, dict):
                fields, record = record, record.get(text_field)
                if not isinstance(record, str | bytes) and len(seen) < 20:
                    seen.update(dict.fromkeys(list(fields)[:20]))
            if isinstance(record, bytes):
                try:
                    record = record.decode()
                except UnicodeDecodeError:
                    record = _UNDECODABLE
            if isinstance(record, str) and not _encodable(record):
                record = _UNDECODABLE  # lone surrogates: "\ud800" in JSON, broken bytes in CSV
            if record is _UNDECODABLE:
                bad.undecodable += 1
            elif not isinstance(record, str):
                bad.missing_field += 1
                missing += 1
            elif not record:
                bad.empty += 1
            else:
                yield (source.name if source.format == "txt" else f"{source.name}#{number}"), record
    except OSError as e:
        raise UserError(f"{source.path}: read failed ({e.strerror or _one_line(e)}); check the file") from None
    if parsed and missing == parsed:  # a wrong --text-field, not a few bad records
        raise UserError(f"{source.path}: no record has a string field '{text_field}' (fields seen: "
                        f"{', '.join(seen) or 'none'}); name the text field with --text-field")
    if missing * 2 > parsed:  # most of the output would be missing: not a few bad records either
        raise UserError(f"{source.path}: {missing} of {parsed} records have no string field '{text_field}' "
                        f"(their fields: {', '.join(seen) or 'none'}); name the text field with --text-field, "
                        "or fix or leave out those records")


def _encodable(text: str) -> bool:
    try:
        text.encode()
        return True
    except UnicodeEncodeError:
        return False


def _records(source: Source, text_field: str) -> Iterator[object]:
    """Raw records: dicts (fields), strings or bytes (the text itself), None, or _UNDECODABLE."""
    path = source.path
    if source.format == "txt":
        yield path.read_bytes()
    elif source.format == "jsonl":
        yield from _json_lines(path)
    elif source.format == "json":
        data = path.read_bytes()
        try:
            whole = json.loads(data)
        except ValueError:  # not one JSON document: JSON lines, or broken
            yield from _json_lines(path)
            return
        yield from whole if isinstance(whole, list) else [whole]
    elif source.format == "csv":
        csv.field_size_limit(sys.maxsize)
        with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is not None and text_field not in reader.fieldnames:
                raise UserError(f"{path}: no column '{text_field}' (columns: {', '.join(reader.fieldnames)}); "
                                "name the text column with --text-field")
            try:
                yield from reader
            except csv.Error as e:
                raise UserError(f"{path}: not valid CSV at line {reader.line_num} ({e}); fix the file") from None
    elif source.format == "arrow":
        yield from _arrow(path, text_field)
    else:
        yield from _parquet(path, text_field)


def _json_lines(path: Path) -> Iterator[object]:
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                try:
                    yield json.loads(line)
                except ValueError:  # invalid JSON or invalid UTF-8
                    yield _UNDECODABLE


def _parquet(path: Path, text_field: str) -> Iterator[object]:
    import pyarrow as pa

    pf = _parquet_file(path, text_field)
    try:
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=[text_field]):
            yield from batch.column(0).to_pylist()
    except (pa.ArrowException, ValueError) as e:  # ArrowInvalid is a ValueError; ArrowIOError an OSError
        raise UserError(f"{path}: not a readable parquet file ({_one_line(e)}); replace or leave it out") from None


def _parquet_file(path: Path, text_field: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, ValueError) as e:
        raise UserError(f"{path}: not a readable parquet file ({_one_line(e)}); replace or leave it out") from None
    if text_field not in pf.schema_arrow.names:
        raise UserError(f"{path}: no column '{text_field}' (columns: {', '.join(pf.schema_arrow.names)}); "
                        "name the text column with --text-field")
    return pf


def _arrow(path: Path, text_field: str) -> Iterator[object]:
    with _arrow_reader(path, text_field) as (batches, column):
        for batch in batches:
            for start in range(0, batch.num_rows, BATCH_ROWS):
                yield from batch.column(column).slice(start, BATCH_ROWS).to_pylist()


@contextlib.contextmanager
def _arrow_reader(path: Path, text_field: str) -> Iterator[tuple[Iterator, int]]:
    """Record batches of an Arrow IPC stream (what `datasets` writes) or file, memory-mapped, and the text
    column's index; errors while reading them inside the `with` are one line too."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as f:
            is_file = f.read(6) == b"ARROW1"  # the file format's magic; a stream starts with a message
            f.seek(0)
            reader = pa.ipc.open_file(f) if is_file else pa.ipc.open_stream(f)
            names = reader.schema.names
            if text_field not in names:
                raise UserError(f"{path}: no column '{text_field}' (columns: {', '.join(names)}); "
                                "name the text column with --text-field")
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches)) if is_file else reader
            yield batches, names.index(text_field)
    except (pa.ArrowException, ValueError) as e:
        raise UserError(f"{path}: not a readable Arrow file ({_one_line(e)}); replace or leave it out") from None


def check_columns(source: Source, text_field: str) -> None:
    """Fail before any output on what a file declares up front: a parquet or Arrow schema, a CSV header."""
    if source.format == "parquet":
        _parquet_file(source.path, text_field)
    elif source.format == "arrow":
        with _arrow_reader(source.path, text_field):
            pass
    elif source.format == "csv":
        with contextlib.closing(_records(source, text_field)) as records:
            next(records, None)


def open_tokens(source: Source, bin_dtype: str) -> np.ndarray:
    """A flat, read-only memory map of a token array (`.bin` raw as nanoGPT writes it, or `.npy`)."""
    path = source.path
    try:
        if source.format == "bin":
            size, itemsize = path.stat().st_size, np.dtype(bin_dtype).itemsize
            if size % itemsize:
                raise UserError(f"{path}: {size} bytes is not a whole number of {bin_dtype} ids; "
                                "pass the --bin-dtype it was written with")
            return np.memmap(path, dtype=bin_dtype, mode="r") if size else np.zeros(0, bin_dtype)
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or _one_line(e)}); check the file") from None
    except ValueError as e:
        raise UserError(f"{path}: not a .npy array file ({_one_line(e)}); replace or leave it out") from None
    if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.integer):
        raise UserError(f"{path}: holds {getattr(array, 'dtype', type(array).__name__)}, not integer token ids; "
                        "save the token ids as an integer array")
    return array.reshape(-1)


def id_range(array: np.ndarray, chunk: int = 1 << 24) -> tuple[int, int]:
    """(min, max) id of a possibly huge memory map, a chunk at a time; (0, -1) when empty."""
    parts = [(int(p.min()), int(p.max())) for p in (array[i:i + chunk] for i in range(0, len(array), chunk))]
    return (min(lo for lo, _ in parts), max(hi for _, hi in parts)) if parts else (0, -1)
