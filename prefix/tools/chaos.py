"""Chaos harness: kill a real 2-rank run at random moments until it completes, then prove nothing changed.

`prefix chaos --kills 12` runs one config under `torchrun --standalone --nproc-per-node 2`, kills
it the ways a cluster does, restarts the same command until it exits 0, then compares it with the same
config trained without interruption: every step's loss and the final weights must be bitwise equal.
Kill kinds, cycled in seeded shuffled rounds so that every kind is used once there are enough kills:
- sigterm: SIGTERM to torchrun (a pod's PID 1), SIGKILL of what is still alive after --grace (Kubernetes);
- sigkill: SIGKILL of every process of the run at once (a container runtime, the OOM killer);
- during-checkpoint: SIGKILL as soon as a `*.tmp` file appears in checkpoints/ (a write in progress);
- during-eval: SIGKILL right after the metrics line of an evaluation step (evaluation runs next);
- during-startup: SIGKILL between launch and the first new step (imports, rendezvous, resume).
sigterm, sigkill and during-checkpoint wait a random time after the first new step, so starts progress.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from prefix import config
from prefix.errors import UserError
from prefix.tools.processes import Launch, Tail, checkout_file, train_cmd

NPROC = 2
KINDS = ("sigterm", "sigkill", "during-checkpoint", "during-eval", "during-startup")
AIMS = {"sigterm": "final checkpoint saved", "sigkill": "after a new step",  # what a kill that landed did
        "during-checkpoint": "*.tmp present", "during-eval": "before the eval line",
        "during-startup": "before the first new step"}
DEFAULTS = ("trainer.max_steps=300", "checkpoint.every_steps=5")  # room for many kills; overrides win
SAVED = "stopped by signal after final checkpoint"  # the daemon's log event
START_TIMEOUT, RUN_TIMEOUT, WRITE_TIMEOUT = 300.0, 900.0, 20.0  # seconds


class ChaosError(RuntimeError):
    """A start crashed or hung by itself: the daemon, not the harness, has a problem."""


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
    cycles: int  # starts of the chaos run
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

    def by_kind(self, landed_only: bool = False) -> dict[str, int]:
        counts = Counter(k.kind for k in self.kills if k.landed or not landed_only)
        return {kind: counts[kind] for kind in KINDS}

    @property
    def ok(self) -> bool:
        return self.unreadable == 0 and self.losses_identical and self.weights_identical

    def __str__(self) -> str:
        yes, made, landed = {True: "yes", False: "NO"}, self.by_kind(), self.by_kind(landed_only=True)
        return "\n".join([
            f"cycles (starts)    {self.cycles}",
            f"kills              {len(self.kills)}: " + ", ".join(f"{k} {n}" for k, n in made.items() if n),
            "  landed           " + ", ".join(f"{k} {landed[k]}/{n} {AIMS[k]}" for k, n in made.items() if n),
            f"resumes            {self.resumes}", f"steps redone       {self.redone}",
            f"unreadable ckpts   {self.unreadable}",
            f"losses identical   {yes[self.losses_identical]} ({self.steps} steps)",
            f"weights identical  {yes[self.weights_identical]}", f"wall time          {self.wall_s:.1f} s",
            "PASS" if self.ok else "FAIL"])


def kill_plan(n: int, kinds: Sequence[str], rng: random.Random) -> list[str]:
    """Kinds cycled in shuffled rounds: random, yet every kind appears once n >= len(kinds)."""
    plan: list[str] = []
    while len(plan) < n:
        plan += rng.sample(list(kinds), len(kinds))
    return plan[:n]


@dataclass
class Chaos:
    """Makes the starts of one run, aiming the kills with what the latest start measured."""

    cmd: Callable[[Path], list[str]]
    cfg: config.Config
    rng: random.Random
    grace: float
    startup: float = 3.0  # seconds from launch to the first new step
    rate: float = 10.0  # steps per second
    made: list[Kill] = field(default_factory=list)

    def start(self, run_dir: Path, kind: str | None, kills_left: int = 0) -> Kill | None:
        """One start, killed as `kind` says (None: let it finish). Returns the kill; None if it exited 0."""
        with Launch(self.cmd(run_dir), run_dir) as s:
            if kind == "during-startup":
                status = s.wait_for(s.steps, self.rng.uniform(0, self.startup))
                return self._finished(s) if status == "exit" else self._kill(s, kind)
            status = s.wait_for(s.steps, START_TIMEOUT)
            if status == "timeout":
                raise ChaosError(f"{s.log}: no training step within {START_TIMEOUT:.0f} s of a start")
            if status == "exit" or kind is None:
                return self._finished(s)
            self.startup = time.monotonic() - s.t0
            if kind == "during-eval":
                status = s.wait_for(lambda: self._eval_step(s), RUN_TIMEOUT, every=0.001)
            else:  # a random moment, spreading the kills over the steps left
                share = (self.cfg.trainer.max_steps - s.steps()[-1]) / self.rate / (kills_left + 1)
                status = s.wait_for(lambda: False, self.rng.uniform(0, max(share, 0)), every=0.05)
                if kind == "during-checkpoint" and status != "exit":  # no write in time: kill now anyway
                    status = s.wait_for(s.tmp_files, WRITE_TIMEOUT, every=0.001)
            return self._finished(s) if status == "exit" else self._kill(s, kind)

    def _eval_step(self, s: Launch) -> int | None:
        """The first step of this start after which the trainer evaluates."""
        t = self.cfg.trainer
        return next((n for n in s.steps() if n % t.eval_every == 0 or n == t.max_steps), None)

    def _kill(self, s: Launch, kind: str) -> Kill | None:
        if s.proc.poll() is not None:  # it ended by itself just now
            return self._finished(s)
        at, exited = time.monotonic() - s.t0, False
        if kind == "sigterm":
            s.proc.send_signal(signal.SIGTERM)
            exited = s.wait_for(lambda: False, self.grace, every=0.01) == "exit"
        s.kill()
        self._measure(s)
        tmp, steps, evaluated = s.tmp_files(), s.steps(), [r["step"] for r in s.evals.read()]
        aimed = self._eval_step(s)
        landed, detail = {  # judged from what the killed processes left: did the kill hit its target?
            "sigterm": (any(e["event"] == SAVED for e in s.events.read()),
                        "exited by itself" if exited else "SIGKILLed after the grace"),
            "sigkill": (True, ""),
            "during-checkpoint": (bool(tmp), " ".join(tmp)),
            "during-eval": (aimed is not None and aimed not in evaluated, f"evaluation of step {aimed}"),
            "during-startup": (not steps, ""),
        }[kind]
        self.made.append(Kill(kind, len(self.made) + 1, at, max(steps, default=0), landed, detail))
        return self.made[-1]

    def _finished(self, s: Launch) -> None:
        """The launch ends by itself: it must exit 0."""
        with suppress(subprocess.TimeoutExpired):
            s.proc.wait(RUN_TIMEOUT)
        if s.proc.returncode != 0:
            tail = "\n".join(s.log.read_text(errors="replace").splitlines()[-15:])
            raise ChaosError(f"{s.log}: a start exited {s.proc.returncode} by itself; last lines:\n{tail}")
        self._measure(s)

    def _measure(self, s: Launch) -> None:
        if len(recs := s.train.read()) >= 2 and recs[-1]["time"] > recs[0]["time"]:
            self.rate = (len(recs) - 1) / (recs[-1]["time"] - recs[0]["time"])


def losses(run_dir: Path) -> dict[int, float]:
    """Loss per step; a step redone after a kill keeps its last value."""
    return {r["step"]: r["loss"] for r in Tail(run_dir / "metrics" / "train.jsonl", from_start=True).read()}


def count_events(run_dir: Path, logs: str, prefix: str) -> int:
    """Log events whose name starts with `prefix`, in the logs matching `logs` (e.g. rank*.jsonl)."""
    return sum(e.get("event", "").startswith(prefix) for log in (run_dir / "logs").glob(logs)
               for e in Tail(log, from_start=True).read())


def same_weights(a: Path, b: Path) -> bool:
    import torch  # only here: the harness itself needs no torch

    from prefix.state import read_verified

    wa, wb = (read_verified(d / "checkpoints", str(d / "checkpoints" / "latest.pt"))[0].model for d in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def play(config_path: Path, kills: int, seed: int, runs_root: Path, grace: float = 10.0,
        overrides: Sequence[str] = (), baseline: Path | None = None, keep: bool = True,
        echo: Callable[[str], None] = print) -> Report:
    """Kill the run `kills` times (fewer if it finishes first), let it complete, compare with the baseline:
    trained here first, which also measures the pace that aims the kills, unless a finished one is given."""
    began, overrides = time.monotonic(), [*DEFAULTS, *overrides]
    cfg = config.load(config_path, overrides)
    config.check_world(cfg, NPROC)
    if baseline is not None and not (baseline / "checkpoints" / "latest.pt").is_file():
        raise UserError(f"--baseline: {baseline} holds no checkpoints/latest.pt; pass a finished run")
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    run_dir, ours = runs_root / f"chaos-{stamp}", [runs_root / f"chaos-{stamp}"]

    def cmd(d: Path) -> list[str]:
        return train_cmd(NPROC, d.name, d.parent, Path(config_path).resolve(), *overrides)

    chaos = Chaos(cmd, cfg, random.Random(seed), grace)
    plan = kill_plan(kills, [k for k in KINDS if k != "during-eval" or cfg.trainer.eval_every], chaos.rng)
    runs_root.mkdir(parents=True, exist_ok=True)
    try:
        if baseline is None:
            baseline = runs_root / f"baseline-{stamp}"
            ours.append(baseline)
            echo(f"baseline: {baseline}")
            chaos.start(baseline, None)
        echo(f"chaos run: {run_dir}")
        for kind in plan:
            if (kill := chaos.start(run_dir, kind, len(plan) - len(chaos.made))) is None:
                break  # it finished before this kill
            echo(f"start {kill.start}: {kind} at {kill.at:.2f} s, step {kill.step}: "
                 f"{'landed' if kill.landed else 'MISSED'} ({AIMS[kind]}) {kill.detail}".rstrip())
        else:
            chaos.start(run_dir, None)  # every kill made: let it finish
        mine, base, t = losses(run_dir), losses(baseline), cfg.trainer
        logged = {s for s in range(1, t.max_steps + 1) if s % t.log_every == 0 or s == t.max_steps}
        lines = len(Tail(run_dir / "metrics" / "train.jsonl", from_start=True).read())
        resumes = count_events(run_dir, "rank0.jsonl", "resumed from step")
        return Report(len(chaos.made) + 1, chaos.made, resumes, lines - len(mine),
                      count_events(run_dir, "rank*.jsonl", "checkpoint unusable"),
                      mine == base and set(mine) == logged, same_weights(run_dir, baseline), len(mine),
                      time.monotonic() - began, run_dir, baseline)
    finally:
        for d in [] if keep else ours:
            shutil.rmtree(d, ignore_errors=True)
            (d.parent / f"{d.name}.log").unlink(missing_ok=True)


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (default: configs/tiny.yaml of this checkout)")
    p.add_argument("--kills", type=int, default=6, help="kills to make before letting the run finish")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill kinds and moments")
    p.add_argument("--runs-root", type=Path, help="folder of the run directories (default: a temporary one)")
    p.add_argument("--grace", type=float, default=10.0, help="seconds from SIGTERM to SIGKILL (k8s: 30)")
    p.add_argument("--baseline", type=Path, help="a finished uninterrupted run of the same config")
    p.add_argument("--keep", action="store_true", help="keep the run directories")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help=f"config overrides for training, applied after the harness's {' '.join(DEFAULTS)}")


def run(args: argparse.Namespace) -> int:
    if args.kills < 0 or args.grace < 0:
        raise UserError("--kills and --grace must be 0 or more")
    config_path = Path(args.config) if args.config else checkout_file("configs/tiny.yaml", "--config FILE")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # unwind, killing the run's processes
    root = args.runs_root or Path(tempfile.mkdtemp(prefix="prefix-chaos-"))
    try:
        report = play(config_path, args.kills, args.seed, root, args.grace, args.overrides, args.baseline, args.keep)
    except ChaosError as e:
        print(f"chaos: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("chaos: interrupted; every process of the run was killed", file=sys.stderr)
        return 130
    finally:
        if not args.keep and not args.runs_root:
            shutil.rmtree(root, ignore_errors=True)
    print(report if not args.keep else f"{report}\nkept: {report.run_dir} {report.baseline_dir}")
    return 0 if report.ok else 1
