"""What a checkpoint holds, how it is written so a crash never leaves it unusable, and resume.

Files in `<run>/checkpoints/`:
- `latest.pt` (rank 0): model, optimizer, scheduler, step, tokens_seen, dataloader, config, ...
- `latest_rank{r}.pt` (every rank): that rank's RNG states and the step they belong to;
- `prev.pt`, `prev_rank{r}.pt`: the checkpoint before, kept as the fallback.

Saving is collective. Every rank writes its files under a temporary name and fsyncs them; after
a barrier each rank commits: it moves the file of the last committed step to `prev*` (or drops
an orphan newer file, see `_publish`) and renames the temporary file to `latest*`, then fsyncs
the folder. So at every instant each rank holds the last committed step in `latest*` or `prev*`;
resume picks the newest step for which the global file and every rank file exist and load.
All files load with `torch.load(weights_only=True)`: RNG states are stored as tensors.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prefix import distributed
from prefix.config import CheckpointConfig
from prefix.distributed import World

FORMAT_VERSION = 1
SLOTS = ("latest", "prev")


def global_name(slot: str) -> str:
    return f"{slot}.pt"


def rank_name(slot: str, rank: int) -> str:
    return f"{slot}_rank{rank}.pt"


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain types (weights_only-loadable)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(obj: Any, path: Path) -> None:
    """torch.save to `path` and fsync it, so a later rename publishes complete bytes."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _load(path: Path) -> dict[str, Any] | None:
    """The checkpoint at `path`, or None if it is missing or unreadable (partly written, damaged)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # missing, truncated, damaged: all mean "not usable"
        return None


@dataclass
class Resume:
    """Where the chosen checkpoint lives: its step, and the slot of each file."""

    step: int
    global_slot: str
    rank_slots: dict[int, str] = field(default_factory=dict)


def choose(folder: Path, world_size: int) -> tuple[Resume | None, list[str]]:
    """The newest step whose global file and rank files (for the ranks that will load) all load.

    Returns the choice and notes on what was skipped, for the log.
    """
    notes: list[str] = []
    found = []
    for slot in SLOTS:
        state = _load(folder / global_name(slot))
        if state is not None:
            found.append((int(state["step"]), slot, int(state.get("world_size", 1))))
        elif (folder / global_name(slot)).exists():
            notes.append(f"{global_name(slot)} is unreadable")
    for step, slot, saved_world in sorted(found, reverse=True):
        rank_slots = {}
        for r in range(min(saved_world, world_size)):
            for rslot in SLOTS:
                rstate = _load(folder / rank_name(rslot, r))
                if rstate is not None and int(rstate["step"]) == step:
                    rank_slots[r] = rslot
                    break
        if len(rank_slots) == min(saved_world, world_size):
            return Resume(step, slot, rank_slots), notes
        notes.append(f"step {step} in {global_name(slot)} lacks rank files; skipped")
    return None, notes


class Checkpointer:
    """Saves and restores the run's checkpoints; the trainer hands it plain state dicts."""

    def __init__(self, folder: Path, world: World, cfg: CheckpointConfig):
        self.folder = folder
        self.world = world
        self.cfg = cfg
        self.committed_step: int | None = None
        self._slot_global: str | None = None  # where the committed step's files live
        self._slot_rank: str | None = None
        self._last_save_time = time.monotonic()

    # -- resume -------------------------------------------------------------------------
    def find(self) -> tuple[Resume | None, list[str]]:
        """Rank 0 inspects the folder; every rank gets the same answer."""
        choice = choose(self.folder, self.world.world_size) if self.world.is_main else None
        return distributed.broadcast(self.world, choice)

    def load(self, choice: Resume) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The global state and this rank's state (None when this rank did not exist then)."""
        state = torch.load(self.folder / global_name(choice.global_slot), map_location="cpu",
                           weights_only=True)
        mine = choice.rank_slots.get(self.world.rank)
        rank_state = None if mine is None else torch.load(
            self.folder / rank_name(mine, self.world.rank), map_location="cpu", weights_only=True)
        self.committed_step = choice.step
        self._slot_global = choice.global_slot
        self._slot_rank = mine
        return state, rank_state

    def clean_temporary(self) -> None:
        """Drop temporary files left by a write that was killed (rank 0, before any save)."""
        if self.world.is_main and self.folder.is_dir():
            for tmp in self.folder.glob("*.tmp"):
                tmp.unlink(missing_ok=True)

    # -- save ---------------------------------------------------------------------------
    def seconds_due(self) -> bool:
        s = self.cfg.every_seconds
        return bool(s) and time.monotonic() - self._last_save_time >= s

    def steps_due(self, step: int) -> bool:
        return bool(self.cfg.every_steps) and step % self.cfg.every_steps == 0

    def save(self, step: int, global_state: Callable[[], dict[str, Any]], rank_state: dict[str, Any]) -> float:
        """Collective: write, barrier, commit, barrier. Returns the seconds it took."""
        start = time.monotonic()
        self.write(step, global_state, rank_state)
        distributed.barrier(self.world)  # every file of this step is durable somewhere
        self.commit()
        distributed.barrier(self.world)  # the step is committed on every rank
        self.committed_step = step
        self._last_save_time = time.monotonic()
        return self._last_save_time - start

    def write(self, step: int, global_state: Callable[[], dict[str, Any]], rank_state: dict[str, Any]) -> None:
        """Phase 1: this rank's files under temporary names, fsynced."""
        self.folder.mkdir(parents=True, exist_ok=True)
        r = self.world.rank
        write_durably({**rank_state, "step": step, "rank": r, "format_version": FORMAT_VERSION},
                      self.folder / (rank_name("latest", r) + ".tmp"))
        if self.world.is_main:
            write_durably({**global_state(), "step": step, "world_size": self.world.world_size,
                           "format_version": FORMAT_VERSION}, self.folder / (global_name("latest") + ".tmp"))

    def commit(self) -> None:
        """Phase 2, once every rank has written: publish this rank's files."""
        r = self.world.rank
        self._slot_rank = self._publish(rank_name("latest", r), rank_name("prev", r), self._slot_rank)
        if self.world.is_main:
            self._slot_global = self._publish(global_name("latest"), global_name("prev"), self._slot_global)
        _fsync_dir(self.folder)

    def _publish(self, latest: str, prev: str, committed_slot: str | None) -> str:
        """Rename `latest.tmp` to `latest`, keeping the last committed file as `prev`."""
        latest_path, prev_path = self.folder / latest, self.folder / prev
        tmp = self.folder / (latest + ".tmp")
        if committed_slot == "latest":
            if self.cfg.keep_previous:
                os.replace(latest_path, prev_path)
        elif committed_slot == "prev" and latest_path.exists():
            latest_path.unlink()  # a newer step that never completed on every rank
        os.replace(tmp, latest_path)
        if not self.cfg.keep_previous and committed_slot is not None:
            prev_path.unlink(missing_ok=True)
        return "latest"
