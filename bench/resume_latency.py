"""How much longer does a restart take to train again when it resumes from a checkpoint?

`python -m prefix.train` (one process) of configs/demo.yaml widened to 19.4M parameters (a 233 MB
checkpoint: model + AdamW state), launched fresh (new run name, 2 steps, final checkpoint at step 2),
then launched again with trainer.max_steps=4: it finds, verifies (SHA-256) and loads that checkpoint and
trains step 3. For both launches: wall-clock seconds from launch (just before the process is started) to
the first "step" line of its logs/rank0.jsonl (trainer.log_every=1), and the phases in between ("starting",
"model"). Alternated (fresh, resume, fresh, resume, ...) after one warm-up launch that is not counted;
medians. Goal: resume ≤ 1.2 × fresh.

Run: `make bench`, or `.venv/bin/python bench/resume_latency.py [--quick]`.
"""

from __future__ import annotations

from pathlib import Path

import common

PHASES = ("starting", "model", "step")


def launch_to_step(config: Path, overrides: list[str], runs: Path, name: str) -> dict[str, float]:
    """Seconds from launch to each phase's first log line of this start (and "resumed from ..." if any)."""
    launch, launched = common.start(common.train_cmd(0, name, runs, *overrides, config=config), runs / name)
    common.finish(launch)
    seen = {p: common.events(runs / name, p, since=launched) for p in PHASES}
    if not all(seen.values()):
        raise RuntimeError(f"{name}: missing log lines {[p for p in PHASES if not seen[p]]}:\n{common.tail(launch.log)}")
    phases = {p: seen[p][0]["t"] - launched for p in PHASES}
    resumed = [e for e in common.events(runs / name, since=launched) if e["event"].startswith("resumed from step")]
    phases["resumed"] = bool(resumed)
    return phases


def main() -> None:
    args = common.parser(__doc__).parse_args()
    config, model, reps = (common.TINY, [], 1) if args.quick else (common.DEMO, list(common.MEDIUM), 3)
    shared = [*model, "trainer.log_every=1", "trainer.eval_every=0", "checkpoint.every_steps=0",
              "checkpoint.every_seconds=0", "telemetry.system_every_s=10"]
    fresh, resumed, noise, notes = [], [], common.Noise(wait=not args.quick), []
    with common.runs_folder() as tmp:
        runs = Path(tmp)
        if not args.quick:  # the default corpus, the page cache of the imports: not what is measured
            launch_to_step(config, [*shared, "trainer.max_steps=1"], runs, "warm-up")
        for rep in range(reps):
            noise.settle()
            fresh.append(launch_to_step(config, [*shared, "trainer.max_steps=2"], runs, f"r{rep}"))
            noise.settle()
            resumed.append(launch_to_step(config, [*shared, "trainer.max_steps=4"], runs, f"r{rep}"))
            if fresh[-1]["resumed"] or not resumed[-1]["resumed"]:
                raise RuntimeError(f"rep {rep}: the fresh start resumed or the restart did not")
            print(f"rep {rep + 1}/{reps}: launch → first step: fresh {fresh[-1]['step']:.2f} s, "
                  f"resume {resumed[-1]['step']:.2f} s", flush=True)
    figures: dict[str, object] = {"repetitions": reps}
    for label, runs_ in (("fresh", fresh), ("resume", resumed)):
        for phase in PHASES:
            figures[f"{label}_launch_to_{'first_step' if phase == 'step' else phase}_s"] = common.median(
                [r[phase] for r in runs_])
    ratio = figures["resume_launch_to_first_step_s"] / figures["fresh_launch_to_first_step_s"]
    for label in ("fresh", "resume"):
        print(f"{label:>6}: launch → starting {figures[f'{label}_launch_to_starting_s']:.2f} s → model "
              f"{figures[f'{label}_launch_to_model_s']:.2f} s → first step {figures[f'{label}_launch_to_first_step_s']:.2f} s")
    checks = [common.check("resume ÷ fresh, launch → first step", ratio, at_most=1.2)]
    setup = (f"{common.model_name(config, model, ' (233 MB checkpoint)')}, one process, "
             f"{reps} alternating fresh/resume pairs after a warm-up launch; medians")
    common.write_results(args.out, "resume_latency", args.quick, setup, figures, checks, notes, noise)


if __name__ == "__main__":
    main()
