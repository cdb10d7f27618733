"""What a chaos run is judged on: the kills it made, and its end compared with the uninterrupted run.

Without `resize` the end must be bitwise the uninterrupted run's: every step's loss and the final
weights. With `resize` (starts on 1, 2 or 3 ranks) sums are reduced in another order, so bitwise is
out of reach by design; the run must instead train on every sample of each epoch exactly once, the
same samples as the uninterrupted run, with every step's loss within LOSS_TOLERANCE of its loss.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from prefix.tools.processes import Tail

KINDS = ("sigterm", "sigkill", "during-checkpoint", "during-eval", "during-startup", "double-start", "zombie",
         "resize")
OWN_PROCESSES = KINDS[:5]
"""The kills of a start's own processes; the kinds after them are faults between pods."""
AIMS = {"sigterm": "final checkpoint saved", "sigkill": "after a new step",  # what a kill that landed did
        "during-checkpoint": "*.tmp present", "during-eval": "before the eval line",
        "during-startup": "before the first new step", "double-start": "second start refused with 2",
        "zombie": "woken start fenced (3), wrote nothing", "resize": "final checkpoint saved"}
LOSS_TOLERANCE = 0.05
"""With resize: the largest difference in any step's loss (nats) from the uninterrupted run's."""


@dataclass
class Kill:
    kind: str
    start: int  # 1-based
    at: float  # seconds after launch
    step: int  # last step in metrics/train.jsonl when killed
    landed: bool  # it hit what its kind aims at (AIMS)
    detail: str = ""


@dataclass
class Report:
    cycles: int  # starts of the chaos run (a double start's or a zombie's second start not counted)
    kills: list[Kill]
    resumes: int
    redone: int  # steps trained again after a kill: metrics lines beyond one per step
    unreadable: int  # "checkpoint unusable" events at resume
    losses_identical: bool
    weights_identical: bool
    steps: int
    wall_s: float
    run_dir: Path
    baseline_dir: Path
    zombie_writes: int = 0  # zombies that changed checkpoints/ or metrics/ after waking: must be 0
    resized: bool = False
    samples_once: bool | None = None  # with resize: every sample of each epoch once, the baseline's samples
    loss_gap: float | None = None  # with resize: the largest |loss - baseline loss| over the steps

    def by_kind(self, landed_only: bool = False) -> dict[str, int]:
        counts = Counter(k.kind for k in self.kills if k.landed or not landed_only)
        return {kind: counts[kind] for kind in KINDS}

    @property
    def ok(self) -> bool:
        healthy = self.unreadable == 0 and self.zombie_writes == 0
        if self.resized:
            return healthy and bool(self.samples_once) and self.loss_gap is not None \
                and self.loss_gap <= LOSS_TOLERANCE
        return healthy and self.losses_identical and self.weights_identical

    def __str__(self) -> str:
        yes, made, landed = {True: "yes", False: "NO"}, self.by_kind(), self.by_kind(landed_only=True)
        lines = [
            f"cycles (starts)    {self.cycles}",
            f"kills              {len(self.kills)}: " + ", ".join(f"{k} {n}" for k, n in made.items() if n),
            "  landed           " + ", ".join(f"{k} {landed[k]}/{n} {AIMS[k]}" for k, n in made.items() if n),
            f"resumes            {self.resumes}", f"steps redone       {self.redone}",
            f"unreadable ckpts   {self.unreadable}", f"zombie writes      {self.zombie_writes}"]
        if self.resized:
            gap = "n/a" if self.loss_gap is None else f"{self.loss_gap:.1e}"
            lines += [f"samples once       {yes[bool(self.samples_once)]} (each epoch, as uninterrupted)",
                      f"loss gap           {gap} (tolerance {LOSS_TOLERANCE}; {self.steps} steps; ranks resized, "
                      "so not bitwise)"]
        else:
            lines += [f"losses identical   {yes[self.losses_identical]} ({self.steps} steps)",
                      f"weights identical  {yes[self.weights_identical]}"]
        return "\n".join([*lines, f"wall time          {self.wall_s:.1f} s", "PASS" if self.ok else "FAIL"])


def losses(run_dir: Path) -> dict[int, float]:
    """Loss per step; a step redone after a kill keeps its last value."""
    return {r["step"]: r["loss"] for r in Tail(run_dir / "metrics" / "train.jsonl", from_start=True).read()}


def loss_gap(run_dir: Path, baseline: Path) -> float | None:
    mine, base = losses(run_dir), losses(baseline)
    return max((abs(mine[s] - base[s]) for s in base), default=None) if mine.keys() == base.keys() else None


def count_events(run_dir: Path, logs: str, prefix: str) -> int:
    """Log events whose name starts with `prefix`, in the logs matching `logs` (e.g. rank*.jsonl)."""
    return sum(e.get("event", "").startswith(prefix) for log in (run_dir / "logs").glob(logs)
               for e in Tail(log, from_start=True).read())


def same_weights(a: Path, b: Path) -> bool:
    import torch  # only here: the harness itself needs no torch

    from prefix.state import read_verified

    wa, wb = (read_verified(d / "checkpoints", str(d / "checkpoints" / "latest.pt"))[0].model for d in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def samples_by_epoch(run_dir: Path) -> dict[int, list[int]]:
    """The dataset indices trained on, by data epoch (`data.record_samples`). A step redone after a kill
    counts once: only the records of the last start (lease epoch) that trained it."""
    by_step: dict[int, dict[int, list]] = defaultdict(dict)
    for path in sorted((run_dir / "metrics").glob("samples_rank*.jsonl")):
        for r in Tail(path, from_start=True).read():
            by_step[r["step"]].setdefault(r.get("lease_epoch", 0), []).append(r)
    seen: dict[int, list[int]] = defaultdict(list)
    for starts in by_step.values():
        for record in starts[max(starts)]:
            seen[record["epoch"]] += record["indices"]
    return {epoch: sorted(ids) for epoch, ids in seen.items()}


def samples_once(run_dir: Path, baseline: Path) -> bool:
    """Each epoch's samples exactly once, and the very samples the uninterrupted run trained on."""
    mine = samples_by_epoch(run_dir)
    return bool(mine) and mine == samples_by_epoch(baseline) and all(len(set(v)) == len(v) for v in mine.values())


def snapshot(run_dir: Path) -> dict[str, tuple[int, int]]:
    """Every file under checkpoints/ and metrics/ with its size and mtime: what a woken zombie must not change."""
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for folder in ("checkpoints", "metrics") for p in sorted((run_dir / folder).rglob("*")) if p.is_file()}
