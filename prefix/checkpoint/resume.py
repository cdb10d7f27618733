"""Which checkpoint a start resumes from, and why the others were passed over.

A file is usable when it loads with `weights_only=True` (a pickle that would run code is refused),
was written in this format version, and its checksum is the one a manifest of its step recorded
(in the algorithm the manifest names: `checksums`).
A sharded checkpoint's global file is usable only with its whole folder: every file the manifest
lists for it present with that checksum, and its `.metadata` readable without running code
(`sharded.problem`). The choice is the newest step whose global file and every needed rank file are usable.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prefix.checkpoint.checksums import NAMES, file_sum
from prefix.checkpoint.files import FORMAT_VERSION, SLOTS, global_name, rank_name, read_manifests
from prefix.errors import UserError


class NoUsableCheckpoint(UserError):
    """Checkpoint files exist but none can be resumed from; nothing was changed."""

    same_on_every_rank = True


@dataclass(frozen=True)
class Finding:
    file: str
    reason: str
    unusable: bool = True
    """False for a save that a crash interrupted: expected, and nothing is damaged."""


@dataclass
class Resume:
    """The chosen step, and the slot ("latest" or "prev") that holds each of its files."""

    step: int
    global_slot: str
    rank_slots: dict[int, str] = field(default_factory=dict)


def _refusal(error: Exception) -> str:
    """The line of torch's weights_only error that names what the pickle wanted to call."""
    lines = [s.strip() for s in str(error).splitlines() if "Unsupported" in s or "GLOBAL" in s]
    return lines[0] if lines else type(error).__name__


class _Inspector:
    """Verifies each file once; collects a Finding for every file that is not usable."""

    def __init__(self, folder: Path, ceilings: dict[int, int] | None = None):
        self.folder, self.ceilings = folder, ceilings or {}
        self.manifests, unreadable = read_manifests(folder)
        self.findings = [Finding(name, "manifest is unreadable") for name in unreadable]
        self._seen: dict[str, tuple[int, int] | None] = {}

    def check(self, name: str, role: str) -> tuple[int, int] | None:
        """(step, world size of that save) if the file is usable, else None."""
        if name not in self._seen:
            self._seen[name] = self._check(name, role)
        return self._seen[name]

    def _check(self, name: str, role: str) -> tuple[int, int] | None:
        path = self.folder / name
        if not path.exists():
            return None
        reason, sums = None, {}
        try:
            state: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            version = state.get("format_version") if isinstance(state, dict) else None
            step = int(state["step"]) if version == FORMAT_VERSION else -1
            same_step = [m for m in self.manifests if m.step == step]
            for expected in (m.files[role] for m in same_step if role in m.files):  # each algorithm once
                sums.setdefault(expected.algorithm, file_sum(path, expected.algorithm))
        except pickle.UnpicklingError as e:
            reason = f"refused: loading it would run code ({_refusal(e)})" if "weights_only" in str(e) \
                else "damaged: it does not load"
        except OSError as e:
            reason = f"cannot be read ({e.strerror or e})"
        except Exception:  # truncated zip, garbage bytes: torch raises several kinds
            reason = "damaged or truncated: it does not load"
        else:
            listed = [m for m in same_step if role in m.files and m.lists(role, sums[m.files[role].algorithm])]
            if version != FORMAT_VERSION:
                reason = f"written in checkpoint format {version}; this prefix reads format {FORMAT_VERSION}"
            elif listed and step > self.ceilings.get(listed[0].epoch, step):
                self.findings.append(Finding(name, f"committed under lease epoch {listed[0].epoch} after a later "
                                             f"start resumed from step {self.ceilings[listed[0].epoch]}: written "
                                             "by a start that had been taken over; ignored", unusable=False))
                return None
            elif listed:
                shards = state.get("sharded")  # the folder of a sharded checkpoint: verified whole, or unusable
                if shards:
                    from prefix.checkpoint import sharded  # DCP's import: for sharded checkpoints only

                    reason = sharded.problem(self.folder, shards, sharded.listed(listed[0].files, shards))
                if not reason:
                    return step, listed[0].world_size
            elif same_step:
                named = same_step[0].files.get(role)
                kind = NAMES[named.algorithm] if named else "checksum"
                reason = f"damaged: its {kind} does not match {same_step[0].name}"
            else:
                reason = f"no manifest of step {step} lists it, so it cannot be verified"
        self.findings.append(Finding(name, reason))
        return None


def choose(folder: Path, world_size: int, ceilings: dict[int, int] | None = None
           ) -> tuple[Resume | None, list[Finding]]:
    """The newest usable step for `world_size` ranks (those beyond the saved world start fresh).

    `ceilings` (lease epoch → step, `prefix.runs.lease.ceilings`): a checkpoint committed under an older
    epoch past the step a later epoch resumed from is a fenced start's, and is passed over."""
    if not folder.is_dir():
        return None, []
    inspector = _Inspector(folder, ceilings)
    for slot in SLOTS:
        found = inspector.check(global_name(slot), "global")
        if found is None:
            continue
        step, saved_world = found
        needed = range(min(saved_world, world_size))
        rank_slots = {}
        for r in needed:
            for rslot in SLOTS:
                if (inspector.check(rank_name(rslot, r), f"rank{r}") or (None,))[0] == step:
                    rank_slots[r] = rslot
                    break
        if len(rank_slots) == len(needed):
            if slot != SLOTS[0] and not (folder / global_name(SLOTS[0])).exists():
                inspector.findings.append(Finding(global_name(SLOTS[0]), "missing", unusable=False))
            return Resume(step, slot, rank_slots), inspector.findings
        lacking = ", ".join(str(r) for r in needed if r not in rank_slots)
        inspector.findings.append(Finding(global_name(slot), f"step {step} is incomplete (no usable file of "
                                          f"that step for rank {lacking}): its save was interrupted",
                                          unusable=False))
    if any(f.unusable for f in inspector.findings):
        found = "; ".join(f"{f.file}: {f.reason}" for f in inspector.findings)
        raise NoUsableCheckpoint(f"{folder}: no usable checkpoint ({found}); restore the files from a backup, "
                                 "or move the folder aside to start the run over (nothing was changed)")
    return None, inspector.findings


def verify_save(folder: Path, slot: str = SLOTS[0]) -> list[Finding]:
    """What is wrong with the one save in `folder`'s `slot`, each file verified as `choose` verifies it: the
    global file (and its sharded folder) and the file of every rank of its world. Empty: all usable.
    For a folder that holds exactly one save: a kept step (`checkpoint/history.py`)."""
    inspector = _Inspector(folder)
    found = inspector.check(global_name(slot), "global")
    if found is None:
        return inspector.findings or [Finding(global_name(slot), "missing")]
    step, world = found
    for r in range(world):
        name = rank_name(slot, r)
        checked = inspector.check(name, f"rank{r}")
        if checked is None and not any(f.file == name for f in inspector.findings):
            inspector.findings.append(Finding(name, "missing"))
        elif checked is not None and checked[0] != step:
            inspector.findings.append(Finding(name, f"holds step {checked[0]}, not step {step}"))
    return inspector.findings


def log_findings(log: Any, choice: Resume | None, findings: list[Finding]) -> None:
    """One warning per unusable file, and one naming the step a fallback resumes from."""
    for f in findings:
        if f.unusable:
            log.warning("checkpoint unusable", file=f.file, reason=f.reason)
        else:
            log.info("checkpoint skipped", file=f.file, reason=f.reason)
    if choice is not None and (choice.global_slot != SLOTS[0] or any(f.unusable for f in findings)):
        log.warning(f"falling back to step {choice.step} in {global_name(choice.global_slot)}",
                    step=choice.step, file=global_name(choice.global_slot))
