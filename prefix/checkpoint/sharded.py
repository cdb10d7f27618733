"""Sharded checkpoints (`trainer.parallelism: fsdp`): model and optimizer written with torch.distributed.checkpoint.

Every save writes a fresh folder `checkpoints/sharded-<step>-<token>/` (never a DCP folder in place: a
kill mid-write would leave new shards under old metadata, which loads silently as the wrong step). Each
rank writes its `__<rank>_*.distcp` files; rank 0 writes `.metadata` last. The checksums of all of them
go into the save's manifest beside those of `latest.pt` (which names the folder) and the rank files,
so resume verifies the folder like any other file, and the folder lives exactly as long as a manifest
lists it (`unlisted`).

Reading is guarded twice, as `weights_only` guards `latest.pt`: DCP unpickles `.metadata` with plain
`pickle.load` and the byte items of the shard files (the optimizer's param groups) with
`torch.load(weights_only=False)`, either of which runs code from a crafted file. `Reader` unpickles
`.metadata` with an allow-list of DCP's own classes, and `_Planner` refuses a byte item that
`weights_only` loading refuses.
"""

from __future__ import annotations

import errno
import io
import pathlib
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from prefix.checkpoint.checksums import DEFAULT, NAMES, FileSum, file_sum, matches
from prefix.checkpoint.files import SHARD_FOLDERS

FOLDER = re.compile(r"^sharded-(\d+)-([0-9a-f]+)$")  # files.shard_folder's names
METADATA = ".metadata"


def role(folder: str, file: str) -> str:
    """A shard file's key in a manifest: `<folder>/<file>`."""
    return f"{folder}/{file}"


def write(folder: Path, state: dict[str, Any], rank: int, group: dist.ProcessGroup | None,
          algorithm: str = DEFAULT) -> dict[str, FileSum]:
    """Collective over `group`: this rank's shards of `state` into `folder`; the checksums of the files it wrote.

    A rank that fails to write (a full disk) fails the save on every rank: DCP gathers the errors, and
    each raises them here as one OSError for the checkpointer to report.
    """
    try:
        dcp.save(state, storage_writer=FileSystemWriter(folder, sync_files=True), process_group=group)
    except CheckpointException as e:
        failures = getattr(e, "failures", {}) or {}
        first = next(iter(failures.values()), e)
        text = getattr(first, "strerror", None) or str(first).splitlines()[0]
        raise OSError(getattr(first, "errno", None) or errno.EIO, f"sharded save: {text}") from None
    mine = sorted(folder.glob(f"__{rank}_*.distcp")) + ([folder / METADATA] if rank == 0 else [])
    return {role(folder.name, p.name): file_sum(p, algorithm) for p in mine}


def read(folder: Path, state: dict[str, Any]) -> None:
    """Collective: fill `state`'s tensors (sharded or whole) from `folder`; DCP reshards for any world size.

    Without a process group (a tool reading a run) it reads in this process alone.
    """
    alone = not dist.is_initialized()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")  # alone on purpose
        dcp.load(state, storage_reader=Reader(folder), planner=_Planner(), no_dist=alone)


def listed(manifest_files: dict[str, FileSum], folder: str) -> dict[str, FileSum]:
    """The files of `folder` a manifest lists, by file name."""
    return {key.split("/", 1)[1]: s for key, s in manifest_files.items() if key.startswith(folder + "/")}


def problem(root: Path, name: str, files: dict[str, FileSum]) -> str | None:
    """Why the sharded folder `name` cannot be resumed from (missing, damaged, crafted), or None."""
    folder = root / name
    if not FOLDER.match(name) or METADATA not in files:
        return f"no manifest lists the files of {name}"
    for file, expected in sorted(files.items()):
        path = folder / file
        if not path.is_file():
            return f"{name}/{file} is missing"
        try:
            if not matches(path, expected):
                return f"{name}/{file} is damaged: its {NAMES[expected.algorithm]} does not match the manifest"
        except OSError as e:
            return f"{name}/{file} cannot be read ({e.strerror or e})"
    try:
        Reader(folder).read_metadata()
    except pickle.UnpicklingError as e:
        return f"{name}/{METADATA} refused: {e}"
    except Exception as e:  # noqa: BLE001 (garbage bytes: pickle raises several kinds)
        return f"{name}/{METADATA} does not load ({type(e).__name__})"
    return None


def unlisted(root: Path, manifests_files: list[dict[str, FileSum]]) -> list[Path]:
    """Sharded folders no manifest lists: an interrupted save's, or one whose checkpoint was replaced."""
    keep = {key.split("/", 1)[0] for files in manifests_files for key in files if "/" in key}
    return [p for p in root.glob(SHARD_FOLDERS) if p.is_dir() and p.name not in keep]


def remove(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


# -- reading safely ------------------------------------------------------------------------------

_DCP = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_ALLOWED = {("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
            ("pathlib", "PureWindowsPath"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
            ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset")}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's Metadata and what it holds (dtypes, sizes, paths), nothing that can run code."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _DCP and not name.startswith("__"):
            found = getattr(__import__(module, fromlist=[name]), name, None)
            if isinstance(found, type):  # DCP's dataclasses and enums, not its functions
                return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _ALLOWED:
            return getattr(pathlib, name) if module == "pathlib" else super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which DCP metadata never holds (crafted?)")


class Reader(FileSystemReader):
    """DCP's file reader, unpickling `.metadata` with `_MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import StorageMeta

        with open(Path(self.path) / METADATA, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _Planner(DefaultLoadPlanner):
    """DCP's load planner; a byte item must pass `weights_only` loading before DCP unpickles it."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        torch.load(value, weights_only=True)  # raises UnpicklingError on anything but plain data
        value.seek(0)
        super().load_bytes(read_item, value)
