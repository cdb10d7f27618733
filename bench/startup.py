"""Where does a start's time go before its first step? Imports, then the phases of the log.

1. Imports every restart pays: `python -X importtime -c "import <what prefix.train imports>"` (prefix.train and
   the modules its `run` imports late: the data pipeline, the model, the trainer), per top-level package:
   cumulative (with what it imports first) and self (its own modules only; these add up to the total).
2. Phases of a fresh start of configs/demo.yaml (`python -m prefix.train`, one process, trainer.log_every=1),
   from logs/rank0.jsonl: launch → "starting" (interpreter, imports, config, checkpoint search, data set-up,
   model built, run directory) → "model" (trainer built) → first "step" (first batch, first step).
Ratio: the imports' share of launch → first step. Median of the repetitions.

Run: `make bench`, or `.venv/bin/python bench/startup.py [--quick]`.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import common

MODULES = "prefix.train, prefix.trainer, prefix.model, prefix.data.streams, prefix.data.loader, prefix.data.leftovers"
LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)$")


def import_costs() -> tuple[float, dict[str, float], dict[str, float], dict[str, str]]:
    """Of one import run: total s, and by top-level package: cumulative s, self s, the module that imported it."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {MODULES}"], capture_output=True,
                         text=True, check=True)
    entries = []  # (depth, module, self s, cumulative s) in the order printed: children first
    for line in out.stderr.splitlines():
        m = LINE.match(line)
        if m:
            entries.append((len(m[3]) // 2, m[4], int(m[1]) / 1e6, int(m[2]) / 1e6))
    cumulative, own, via, parents = defaultdict(float), defaultdict(float), {}, []  # parents: (depth, module)
    for depth, module, self_s, cum_s in reversed(entries):  # parents come before their children now
        while parents and parents[-1][0] >= depth:
            parents.pop()
        root = module.split(".")[0]
        if all(m.split(".")[0] != root for _, m in parents):  # entered this package from outside it
            cumulative[root] += cum_s
            via[root] = parents[-1][1] if parents else "-c"  # the last assignment is the first import
        own[root] += self_s
        parents.append((depth, module))
    total = sum(cum for depth, _, _, cum in entries if depth == 0)
    return total, dict(cumulative), dict(own), via


def phases(runs: Path, name: str, config: Path) -> dict[str, float]:
    overrides = ["trainer.max_steps=2", "trainer.log_every=1", "trainer.eval_every=0", "checkpoint.every_steps=0"]
    launch, launched = common.start(common.train_cmd(0, name, runs, *overrides, config=config), runs / name)
    common.finish(launch)
    return {p: common.events(runs / name, p)[0]["t"] - launched for p in ("starting", "model", "step")}


def main() -> None:
    args = common.parser(__doc__).parse_args()
    config, reps = (common.TINY, 1) if args.quick else (common.DEMO, 3)
    noise, notes = common.Noise(wait=not args.quick), []
    if not args.quick:
        import_costs()  # warm the page cache: a restart on the same node finds the files cached too
    runs_ = []
    for _ in range(reps):
        noise.settle()
        runs_.append(import_costs())
    total = common.median([r[0] for r in runs_])
    roots = sorted((k for k in runs_[0][1] if k != "prefix"),  # prefix is the entry point: its cumulative is all
                   key=lambda k: -common.median([r[1].get(k, 0.0) for r in runs_]))
    cumulative = {k: common.median([r[1].get(k, 0.0) for r in runs_]) for k in roots}
    own = {k: common.median([r[2].get(k, 0.0) for r in runs_]) for k in roots}
    with common.runs_folder() as tmp:
        if not args.quick:
            phases(Path(tmp), "warm-up", config)  # the default corpus, if not built yet
        starts = []
        for i in range(reps):
            noise.settle()
            starts.append(phases(Path(tmp), f"s{i}", config))
    step = {p: common.median([s[p] for s in starts]) for p in ("starting", "model", "step")}
    top = roots[:12]
    prefix_own = common.median([r[2]["prefix"] for r in runs_])
    print(f"imports of {MODULES}: {total:.2f} s (prefix's own modules {prefix_own:.3f} s); by top-level package "
          "(cumulative / self):")
    for k in top:
        print(f"  {k:<16} {cumulative[k]:6.3f} s  {own[k]:6.3f} s  (first imported by {runs_[0][3][k]})")
    print(f"{config.name}, one process: launch → starting {step['starting']:.2f} s → model {step['model']:.2f} s → "
          f"first step {step['step']:.2f} s; imports are {100 * total / step['step']:.0f} % of it")
    figures = {"imports_s": total, "launch_to_starting_s": step["starting"], "launch_to_model_s": step["model"],
               "launch_to_first_step_s": step["step"], "starting_to_model_s": step["model"] - step["starting"],
               "model_to_first_step_s": step["step"] - step["model"],
               "prefix_modules_self_s": prefix_own, "import_cumulative_s": {k: cumulative[k] for k in top}, "import_self_s": {k: own[k] for k in top},
               "imported_by": {k: runs_[0][3][k] for k in top},
               "repetitions": reps}
    checks = [common.check("imports ÷ launch → first step", total / step["step"]),
              common.check("launch → starting ÷ launch → first step", step["starting"] / step["step"])]
    setup = (f"`python -X importtime -c \"import {MODULES}\"` after one warm-up; {config.name} fresh starts, one "
             f"process; medians of {reps}")
    common.write_results(args.out, "startup", args.quick, setup, figures, checks, notes, noise)


if __name__ == "__main__":
    main()
