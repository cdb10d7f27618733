"""Chaos harness: kill a real 2-rank run at random moments until it completes, then prove nothing changed.

`prefix chaos --kills 12` runs one config under `prefix launch --standalone --nproc-per-node 2`, kills
it the ways a cluster does, restarts the same command until it exits 0, then compares it with the same
config trained without interruption: every step's loss and the final weights must be bitwise equal.
Kill kinds, cycled in seeded shuffled rounds so that every kind is used once there are enough kills:
- sigterm: SIGTERM to torchrun (a pod's PID 1), SIGKILL of what is still alive after --grace (Kubernetes);
- sigkill: SIGKILL of every process of the run at once (a container runtime, the OOM killer);
- during-checkpoint: SIGKILL as soon as a `*.tmp` file appears in checkpoints/ (a write in progress);
- during-eval: SIGKILL right after the metrics line of an evaluation step (evaluation runs next);
- during-startup: SIGKILL between launch and the first new step (imports, rendezvous, resume);
- double-start: the same start again while one is live: it must be refused with 2; then the live one is killed;
- zombie: every process of a start is stopped (a frozen node), a replacement takes the run over once the
  lease lapses, then the old start wakes: it must exit 3 (fenced), changing nothing under checkpoints/ or
  metrics/; then the (frozen) replacement is killed;
- resize: SIGTERM, and the next start runs on another number of ranks (1, 2 or 3). The end is then judged
  by the samples and the loss curve instead of bitwise (chaos_report.py).
Every start runs under `prefix launch`, so its exit code is the workers'. Kills other than during-startup
and during-eval wait a random time after the first new step, so starts progress.
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
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from prefix import config
from prefix.errors import EXIT_FENCED, EXIT_USER, UserError
from prefix.tools.chaos_report import (
    AIMS,
    KINDS,
    Kill,
    Report,
    count_events,
    loss_gap,
    losses,
    same_weights,
    samples_once,
    snapshot,
)
from prefix.tools.processes import Launch, Tail, checkout_file, train_cmd

NPROC = 2
RANKS = (1, 2, 3)  # what resize chooses from
DEFAULTS = ("trainer.max_steps=600", "checkpoint.every_steps=5",  # room for many kills; overrides win
            "run.lease_timeout_s=2")  # what a double start is refused after (×1.5), what a zombie's replacement waits
AT_ONCE = ("double-start", "zombie")  # made at the first new step: the live start must outlast a second start-up
RESIZE = ("trainer.global_batch_size=12", "data.record_samples=true")  # 12 sequences split over 1, 2 or 3 ranks
SAVED = "stopped by signal after final checkpoint"  # the daemon's log event
START_TIMEOUT, RUN_TIMEOUT, WRITE_TIMEOUT = 300.0, 900.0, 20.0  # seconds


class ChaosError(RuntimeError):
    """A start crashed or hung by itself: the daemon, not the harness, has a problem."""


def kill_plan(n: int, kinds: Sequence[str], rng: random.Random) -> list[str]:
    """Kinds cycled in shuffled rounds: random, yet every kind appears once n >= len(kinds)."""
    plan: list[str] = []
    while len(plan) < n:
        plan += rng.sample(list(kinds), len(kinds))
    return plan[:n]


@dataclass
class Chaos:
    """Makes the starts of one run, aiming the kills with what the latest start measured."""

    cmd: Callable[[Path, int], list[str]]  # (run directory, ranks) → the command of one start
    cfg: config.Config
    rng: random.Random
    grace: float
    nproc: int = NPROC  # ranks of the next start (resize changes it)
    startup: float = 3.0  # seconds from launch to the first new step
    rate: float = 10.0  # steps per second
    made: list[Kill] = field(default_factory=list)
    zombie_writes: int = 0

    def start(self, run_dir: Path, kind: str | None, kills_left: int = 0) -> Kill | None:
        """One start, killed as `kind` says (None: let it finish). Returns the kill; None if it exited 0."""
        with Launch(self.cmd(run_dir, self.nproc), run_dir) as s:
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
            elif kind in AT_ONCE:
                status = "hit"
            else:  # a random moment, spreading the kills over the steps left
                share = (self.cfg.trainer.max_steps - s.steps()[-1]) / self.rate / (kills_left + 1)
                status = s.wait_for(lambda: False, self.rng.uniform(0, max(share, 0)), every=0.05)
                if kind == "during-checkpoint" and status != "exit":  # no write in time: kill now anyway
                    status = s.wait_for(s.tmp_files, WRITE_TIMEOUT, every=0.001)
            if status == "exit":
                return self._finished(s)
            if kind == "double-start":
                return self._double_start(s, run_dir)
            if kind == "zombie":
                return self._zombie(s, run_dir)
            return self._kill(s, kind)

    def _eval_step(self, s: Launch) -> int | None:
        """The first step of this start after which the trainer evaluates."""
        t = self.cfg.trainer
        return next((n for n in s.steps() if n % t.eval_every == 0 or n == t.max_steps), None)

    def _kill(self, s: Launch, kind: str) -> Kill | None:
        if s.proc.poll() is not None:  # it ended by itself just now
            return self._finished(s)
        at, exited = time.monotonic() - s.t0, False
        if kind in ("sigterm", "resize"):
            s.proc.send_signal(signal.SIGTERM)
            exited = s.wait_for(lambda: False, self.grace, every=0.01) == "exit"
        s.kill()
        self._measure(s)
        tmp, steps, evaluated = s.tmp_files(), s.steps(), [r["step"] for r in s.evals.read()]
        aimed = self._eval_step(s)
        saved = any(e["event"] == SAVED for e in s.events.read())
        landed, detail = {  # judged from what the killed processes left: did the kill hit its target?
            "sigterm": (saved, "exited by itself" if exited else "SIGKILLed after the grace"),
            "sigkill": (True, ""),
            "during-checkpoint": (bool(tmp), " ".join(tmp)),
            "during-eval": (aimed is not None and aimed not in evaluated, f"evaluation of step {aimed}"),
            "during-startup": (not steps, ""),
            "resize": (saved, ""),
        }[kind]
        if kind == "resize":
            before, self.nproc = self.nproc, self.rng.choice([n for n in RANKS if n != self.nproc])
            detail = f"{before} → {self.nproc} ranks"
        return self._record(kind, s, at, steps, landed, detail)

    def _record(self, kind: str, s: Launch, at: float, steps: list[int], landed: bool, detail: str) -> Kill:
        self.made.append(Kill(kind, len(self.made) + 1, at, max(steps, default=0), landed, detail))
        return self.made[-1]

    def _double_start(self, s: Launch, run_dir: Path) -> Kill | None:
        """The same start again while this one is live: it must wait, be refused with 2, and harm nothing."""
        at = time.monotonic() - s.t0
        with Launch(self.cmd(run_dir, self.nproc), run_dir, log=run_dir.parent / f"{run_dir.name}.second.log") as d:
            try:
                code = d.proc.wait(START_TIMEOUT)
            except subprocess.TimeoutExpired:
                raise ChaosError(f"{d.log}: a second start of a live run neither ended nor was refused") from None
        if s.proc.poll() not in (None, 0):
            raise ChaosError(f"{s.log}: the live start exited {s.proc.returncode} beside a second start")
        if code not in (0, EXIT_USER):  # 0: the live start finished meanwhile, and the second found it done
            raise ChaosError(f"{d.log}: a second start of a live run exited {code}; it must be refused with 2")
        live = s.proc.poll() is None
        s.kill()
        self._measure(s)
        return self._record("double-start", s, at, s.steps(), code == EXIT_USER and live,
                            "refused" if code == EXIT_USER else f"exited {code}")

    def _zombie(self, s: Launch, run_dir: Path) -> Kill | None:
        """Freeze every process of this start, let a replacement take the run over, freeze that one and wake
        this one: it must exit with the fenced code, having changed nothing under checkpoints/ or metrics/."""
        at = time.monotonic() - s.t0
        s.tree.stop()
        steps = s.steps()
        with Launch(self.cmd(run_dir, self.nproc), run_dir, log=run_dir.parent / f"{run_dir.name}.replacement.log") as r:
            status = r.wait_for(r.steps, START_TIMEOUT)  # it waits for the frozen lease to lapse, then trains
            if status == "timeout":
                raise ChaosError(f"{r.log}: the replacement of a frozen start made no step in {START_TIMEOUT:.0f} s")
            if status == "exit" and r.proc.returncode != 0:
                raise ChaosError(f"{r.log}: the replacement of a frozen start exited {r.proc.returncode}")
            r.tree.stop()  # from here only the zombie could write
            before = snapshot(run_dir)
            s.tree.resume()
            try:
                code = s.proc.wait(RUN_TIMEOUT)
            except subprocess.TimeoutExpired:
                raise ChaosError(f"{s.log}: a start woken after a takeover did not exit") from None
            unchanged = snapshot(run_dir) == before
            self.zombie_writes += not unchanged
            self._measure(r)
        s.kill()
        detail = f"exited {code}" + ("" if unchanged else ", CHANGED checkpoints/ or metrics/")
        return self._record("zombie", s, at, steps, code == EXIT_FENCED and unchanged, detail)

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


def play(config_path: Path, kills: int, seed: int, runs_root: Path, grace: float = 10.0,
         overrides: Sequence[str] = (), baseline: Path | None = None, keep: bool = True,
         echo: Callable[[str], None] = print, kinds: Sequence[str] = KINDS) -> Report:
    """Kill the run `kills` times (fewer if it finishes first), let it complete, compare with the baseline:
    trained here first, which also measures the pace that aims the kills, unless a finished one is given."""
    began, resized = time.monotonic(), "resize" in kinds
    overrides = [*DEFAULTS, *(RESIZE if resized else ()), *overrides]
    cfg = config.load(config_path, overrides)
    for n in RANKS if resized else (NPROC,):
        config.check_world(cfg, n)
    if baseline is not None and not (baseline / "checkpoints" / "latest.pt").is_file():
        raise UserError(f"--baseline: {baseline} holds no checkpoints/latest.pt; pass a finished run")
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    run_dir, ours = runs_root / f"chaos-{stamp}", [runs_root / f"chaos-{stamp}"]

    def cmd(d: Path, nproc: int) -> list[str]:
        return train_cmd(nproc, d.name, d.parent, Path(config_path).resolve(), *overrides, launcher=True)

    chaos = Chaos(cmd, cfg, random.Random(seed), grace)
    plan = kill_plan(kills, [k for k in kinds if k != "during-eval" or cfg.trainer.eval_every], chaos.rng)
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
        resized = any(k.kind == "resize" for k in chaos.made)
        bitwise = not resized and mine == base and set(mine) == logged
        return Report(len(chaos.made) + 1, chaos.made, resumes, lines - len(mine),
                      count_events(run_dir, "rank*.jsonl", "checkpoint unusable"),
                      bitwise, not resized and same_weights(run_dir, baseline), len(mine),
                      time.monotonic() - began, run_dir, baseline, chaos.zombie_writes, resized,
                      samples_once(run_dir, baseline) if resized else None,
                      loss_gap(run_dir, baseline) if resized and set(mine) == logged else None)
    finally:
        for d in [] if keep else ours:
            shutil.rmtree(d, ignore_errors=True)
            for log in d.parent.glob(f"{d.name}*.log"):
                log.unlink(missing_ok=True)


def parse_kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise UserError(f"--kinds: {', '.join(unknown) or 'nothing'} given; choose from {', '.join(KINDS)}")
    return kinds


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (default: configs/tiny.yaml of this checkout)")
    p.add_argument("--kills", type=int, default=6, help="kills to make before letting the run finish")
    p.add_argument("--kinds", default=",".join(KINDS),
                   help=f"comma-separated kinds of kill to draw from (default: all: {','.join(KINDS)}); "
                        "without resize the end must be bitwise the uninterrupted run")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill kinds and moments")
    p.add_argument("--runs-root", type=Path, help="folder of the run directories (default: a temporary one)")
    p.add_argument("--grace", type=float, default=10.0, help="seconds from SIGTERM to SIGKILL (k8s: 30)")
    p.add_argument("--baseline", type=Path, help="a finished uninterrupted run of the same config")
    p.add_argument("--keep", action="store_true", help="keep the run directories")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help=f"config overrides for training, applied after the harness's {' '.join(DEFAULTS)} "
                        f"(and with resize {' '.join(RESIZE)})")


def run(args: argparse.Namespace) -> int:
    if args.kills < 0 or args.grace < 0:
        raise UserError("--kills and --grace must be 0 or more")
    config_path = Path(args.config) if args.config else checkout_file("configs/tiny.yaml", "--config FILE")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # unwind, killing the run's processes
    root = args.runs_root or Path(tempfile.mkdtemp(prefix="prefix-chaos-"))
    try:
        report = play(config_path, args.kills, args.seed, root, args.grace, args.overrides, args.baseline, args.keep,
                      kinds=parse_kinds(args.kinds))
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
