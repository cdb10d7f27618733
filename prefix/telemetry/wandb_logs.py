"""What a W&B run really holds, read from its `.wandb` transaction logs (one per start).

wandb-core writes a start's log in 32 KiB blocks, so a SIGKILL of the pod loses the rows of the
last, unwritten block, although the relay had handed them over. The next start reads the logs of
the earlier starts to find what is there. Each log is read once: a finished start's log does not
change, and its result is kept (by size) in the tracker's state.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
"""LevelDB log chunk types: a record is one FULL chunk, or FIRST, MIDDLE..., LAST."""


def held_in_logs(folder: Path, run_id: str, marks: Mapping[str, str],
                 known: Mapping[str, Any]) -> tuple[dict[str, int], dict[str, Any]]:
    """Per split, the highest value of its mark (`marks`: history key → split) in the logs of W&B run
    `run_id` under `folder` (offline and online run folders alike). `known` is what an earlier call
    returned second: {run folder: {"size", "held"}}; logs of the same size are not read again."""
    held: dict[str, int] = {}
    logs: dict[str, Any] = {}
    for path in sorted(folder.glob(f"*/run-{run_id}.wandb")):
        size = path.stat().st_size
        entry = known.get(path.parent.name)
        if not isinstance(entry, dict) or entry.get("size") != size or not isinstance(entry.get("held"), dict):
            entry = {"size": size, "held": _held_in(path, marks)}
        logs[path.parent.name] = entry
        for split, step in entry["held"].items():
            held[split] = max(int(step), held.get(split, -1))
    return held, logs


def _held_in(path: Path, marks: Mapping[str, str]) -> dict[str, int]:
    held: dict[str, int] = {}
    for record in transaction_log(path):
        if record.WhichOneof("record_type") != "history":
            continue
        for item in record.history.item:
            split = marks.get(item.key or ".".join(item.nested_key))
            value = _number(item.value_json) if split else None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                held[split] = max(held.get(split, -1), int(value))
    return held


def transaction_log(path: Path) -> Iterator[Any]:
    """The records (wandb's protobuf `Record`) of a `.wandb` file: a 7-byte `:W&B` header, then LevelDB
    log blocks of 32 KiB holding chunks (crc32 of type and payload, length, type). Reading ends at the
    first torn or corrupt chunk: where a kill cut the file."""
    from wandb.proto import wandb_internal_pb2

    try:
        data = path.read_bytes()
    except OSError:
        return
    if data[:4] != b":W&B":
        return
    pos, parts = 7, []
    while True:
        room = BLOCK - pos % BLOCK
        if room < 7:  # the writer pads a block's tail that cannot hold a chunk header
            pos += room
        if pos + 7 > len(data):
            return
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        end = pos + 7 + length
        if kind not in (FULL, FIRST, MIDDLE, LAST) or end > len(data) or zlib.crc32(data[pos + 6:end]) != crc:
            return
        parts = [] if kind in (FULL, FIRST) else parts
        parts.append(data[pos + 7:end])
        pos = end
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(b"".join(parts))
            except Exception:
                return
            yield record


def _number(value_json: str) -> Any:
    try:
        return json.loads(value_json)
    except ValueError:
        return None
