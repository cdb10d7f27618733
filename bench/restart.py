"""How long does a resumed 2-rank run take to train again, above the floor, against commit 628b6ac?

A preempted pod's restart pays torchrun, two interpreters importing torch and the rendezvous (the floor:
bench/restart_floor.py, workers that import torch and pass one gloo barrier), then everything prefix does
before its first new step. This measures that part for this checkout and for commit 628b6ac, extracted with
`git archive` into a temporary folder and run from there (working directory and PYTHONPATH; the same
virtual environment and PREFIX_CACHE_DIR, so each finds its default corpus built; both trees' bytecode
compiled first, as an installed image has it):

1. per tree, a 2-rank torchrun of configs/demo.yaml (gloo, CPU) trains 2 steps and writes its final
   checkpoint (not measured);
2. the same command with trainer.max_steps=3 resumes from it: seconds from launch (just before torchrun
   starts) to rank 0's log lines "starting", "resumed from step 2", "model" and the first "step"
   (trainer.log_every=1), and the CPU seconds all its processes had used by that first step;
3. the floor, launched the same way: seconds to rank 0 passing the barrier, and CPU seconds by then.

Each round launches floor, old and new in a rotating order, each at a quiet moment when one comes (30 s at
most); medians over the rounds of (launch → first step − that round's floor). Goal: this checkout's
≤ 0.5 × 628b6ac's. Where the time goes: docs/performance.md#restart-time.

Run: `make bench`, or `.venv/bin/python bench/restart.py [--quick] [--repetitions N]` (--quick: tiny.yaml,
one round).
"""

from __future__ import annotations

import compileall
import contextlib
import io
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import common
import psutil

from prefix.tools.processes import Launch

OLD = "628b6ac"
PHASES = {"starting": "starting", "resumed": "resumed from step 2", "model": "model", "first step": "step"}
"""What the table calls each phase: the log event that ends it."""


def extract(commit: str, folder: Path) -> Path:
    """This repository's `commit`, as files in `folder` (git archive; no change to the checkout)."""
    archive = subprocess.run(["git", "-C", str(common.REPO), "archive", commit], capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def compiled(tree: Path) -> Path:
    """`tree` with its prefix package's bytecode written, as `pip install` leaves an image: a start then reads
    .pyc files instead of compiling the sources (which PYTHONDONTWRITEBYTECODE would make it do every time)."""
    compileall.compile_dir(tree / "prefix", quiet=2)
    return tree


def launch(tree: Path, cmd: list[str], run_dir: Path) -> tuple[Launch, float]:
    """`cmd` run from `tree`: its working directory and PYTHONPATH pick which `prefix` the workers import."""
    with contextlib.chdir(tree):
        begin = time.time()
        return Launch(cmd, run_dir, env={"PYTHONPATH": str(tree)}), begin


def train(tree: Path, config: str, runs: Path, name: str, steps: int) -> tuple[Launch, float]:
    """A 2-rank start of `tree`'s prefix.train (to `steps`) and its launch time."""
    cmd = common.train_cmd(2, name, runs, "trainer.log_every=1", f"trainer.max_steps={steps}",
                           config=tree / "configs" / config)
    return launch(tree, cmd, runs / name)


def cpu_when(started: Launch, seen: Callable[[], bool]) -> float | None:
    """CPU seconds (user + system) every process of the launch, and the children they reaped, had used when
    `seen()` first held (polled every 10 ms); None if the launch ended first."""
    while started.proc.poll() is None:
        if seen():
            started.tree.refresh()
            total = 0.0
            for p in started.tree.procs.values():
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    total += t.user + t.system + t.children_user + t.children_system
            return total
        time.sleep(0.01)
    return None


def resumed(tree: Path, config: str, runs: Path, name: str) -> dict[str, float]:
    """Seconds from launch to each phase of a start that resumes `name` from step 2 and trains step 3, and the
    CPU seconds all its processes had used when its first step was logged."""
    started, launched = train(tree, config, runs, name, 3)
    cpu = cpu_when(started, lambda: any(e.get("event") == "step" for e in started.events.read()))
    common.finish(started)
    seen = {p: common.events(runs / name, event, since=launched) for p, event in PHASES.items()}
    if cpu is None or not all(seen.values()) or seen["first step"][0]["step"] != 3:
        raise RuntimeError(f"{tree}: {name} did not resume from step 2 and train step 3: "
                           f"{ {p: [e.get('step') for e in s] for p, s in seen.items()} }")
    return {**{p: s[0]["t"] - launched for p, s in seen.items()}, "cpu": cpu}


def floor(runs: Path, name: str) -> dict[str, float]:
    """Seconds from launch to rank 0 of bench/restart_floor.py passing its barrier, and the CPU seconds of the
    launch's processes then."""
    mark = runs / f"{name}.t"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(common.REPO / "bench" / "restart_floor.py"), str(mark)]
    started, launched = launch(common.REPO, cmd, runs / name)
    cpu = cpu_when(started, mark.is_file)
    common.finish(started)
    if cpu is None:
        raise RuntimeError(f"the floor's workers did not pass their barrier:\n{common.tail(started.log)}")
    return {"first step": float(mark.read_text()) - launched, "cpu": cpu}


def measure(trees: dict[str, Path], config: str, runs: Path, reps: int, noise: common.Noise) -> list[dict]:
    """`reps` rounds; each: the two checkpoints written, then floor, old and new launched in a rotating order."""
    rounds = []
    for rep in range(reps):
        for label, tree in trees.items():
            common.finish(train(tree, config, runs, f"{label}{rep}", 2)[0])  # the checkpoint to resume from
        order, found = ["floor", "old", "new"], {}
        for label in order[rep % 3:] + order[:rep % 3]:
            noise.settle(max_wait=30, budget=600)  # 15 launches of seconds: worth a wait for a quiet moment
            found[label] = floor(runs, f"floor{rep}") if label == "floor" else \
                resumed(trees[label], config, runs, f"{label}{rep}")
        rounds.append(found)
        print(f"round {rep + 1}/{reps}: launch → first step: floor {found['floor']['first step']:.2f} s, {OLD} "
              f"{found['old']['first step']:.2f} s, now {found['new']['first step']:.2f} s", flush=True)
    return rounds


def summary(rounds: list[dict]) -> dict[str, object]:
    """Medians of the rounds: the floor; per tree each phase from launch, and the first step above the floor
    (that round's) in seconds and in CPU seconds."""
    figures: dict[str, object] = {"repetitions": len(rounds),
                                  "floor_s": common.median([r["floor"]["first step"] for r in rounds]),
                                  "floor_cpu_s": common.median([r["floor"]["cpu"] for r in rounds])}
    for label, name in (("old", f"at_{OLD}"), ("new", "now")):
        above = {key: [r[label][key] - r["floor"][key] for r in rounds] for key in ("first step", "cpu")}
        figures[f"{name}_above_floor_s"] = common.median(above["first step"])
        figures[f"{name}_cpu_above_floor_s"] = common.median(above["cpu"])
        figures[f"{name}_above_floor_rounds_s"] = above["first step"]
        figures[f"{name}_s"] = {**{f"launch → {p}": common.median([r[label][p] for r in rounds]) for p in PHASES},
                                "first step − floor": figures[f"{name}_above_floor_s"],
                                "CPU to first step − floor's": figures[f"{name}_cpu_above_floor_s"]}
    return figures


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--repetitions", type=int, default=5, help="measured rounds (default 5; --quick: 1)")
    args = p.parse_args()
    config, reps = ("tiny.yaml", 1) if args.quick else ("demo.yaml", args.repetitions)
    noise = common.Noise(wait=not args.quick)
    with common.runs_folder() as tmp:
        runs = Path(tmp)
        trees = {"old": compiled(extract(OLD, runs / OLD)), "new": compiled(common.REPO)}
        if not args.quick:  # the page cache: not what is measured
            floor(runs, "warm-up")
        figures = summary(measure(trees, config, runs, reps, noise))
    ratio = figures["now_above_floor_s"] / figures[f"at_{OLD}_above_floor_s"]
    cpu_ratio = figures["now_cpu_above_floor_s"] / figures[f"at_{OLD}_cpu_above_floor_s"]
    print(f"floor {figures['floor_s']:.2f} s; launch → first step above it: {OLD} "
          f"{figures[f'at_{OLD}_above_floor_s']:.2f} s, now {figures['now_above_floor_s']:.2f} s")
    for label, name in ((OLD, f"at_{OLD}_s"), ("now", "now_s")):
        print(f"{label:>8}: " + ", ".join(f"{k} {v:.2f} s" for k, v in figures[name].items()))
    checks = [common.check(f"resumed 2-rank run, launch → first step above the floor: now ÷ {OLD}", ratio, at_most=0.5),
              common.check(f"the same in CPU seconds of all its processes: now ÷ {OLD}", cpu_ratio)]
    setup = (f"{config}, 2 ranks (torchrun, gloo, CPU) resuming from step 2, this checkout and commit {OLD} side by "
             "side, bytecode compiled; floor: 2 workers importing torch and passing one gloo barrier; "
             f"{reps} rounds in rotating order, medians")
    common.write_results(args.out, "restart", args.quick, setup, figures, checks, [], noise)


if __name__ == "__main__":
    main()
