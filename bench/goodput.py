"""Goodput you can predict: preempted on a schedule, fixed checkpoint intervals and `auto` against Young–Daly.

- Runs: `python -m prefix.train` (one process) of configs/demo.yaml (0.9M parameters, 11 MB of model +
  AdamW) with 8 sequences a step (steps well under the intervals), synchronous saves
  (`checkpoint.async=false`: on 2 CPU cores an asynchronous write slows the steps, a cost its stall and
  the ledger would not show), a save every T seconds (`checkpoint.every_seconds`, no step-based saves),
  no evaluation. One run per interval: fixed T of 2 %, 10 % and 40 % of the period, and `auto` (its
  bounds scaled with the period: `min_seconds` P/30, `max_seconds` P, as 60 s and 1800 s are for one
  preemption per 30 minutes).
- Preemptions: prefix/tools/schedule.py, as `prefix simulate --preempt-every P --kind kill --jitter 0.5`
  plays them: SIGKILL of the whole start every P seconds (gaps drawn in P·[0.5, 1.5], the same seed for
  every run), restarted at once; K + 1 preemptions, then one more start, killed at its first step. P is
  15 s, or 3 × the restart a warm-up start measures if that is longer (a busy machine: the full benchmark
  then takes longer than its 5 minutes); `--period` sets it.
- Measured: the goodput of the steady state, starts 1..K (each begun and ended by a preemption; the first
  start, which auto spends without a failure history, is left out), from the run's ledger
  (`prefix.runs.goodput.account`, with the harness's kill times: the step in progress at a kill is redone
  work the ledger alone cannot see). Predicted: `interval.lost_share` from the same starts' measured save
  cost C, interval T, restart R and time between preemptions M (`schedule.measure`, `schedule.predict`).
- Intervals are ranked by the goodput of the time between restarts (productive ÷ (wall − start-up)): the
  interval decides how that time goes (saves, redone work) and not how long a restart takes, whose
  run-to-run noise on a shared machine (seconds) would otherwise decide the ranking.
- From the medians of C and R over all runs: the goodput at one preemption per 30 minutes with auto's
  interval (Young–Daly, bounds 60..1800 s), for SIGKILLs and for SIGTERMs with a final checkpoint.
Goals: auto within 3 points of the best fixed interval; the model within 5 points of the measurements.

Run: `make bench`, or `.venv/bin/python bench/goodput.py [--quick]`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import common

from prefix.checkpoint.interval import lost_share, young_daly
from prefix.config.sections import CheckpointConfig
from prefix.runs.goodput import account
from prefix.tools import schedule
from prefix.tools.processes import Launch

HALF_HOUR = 1800.0
PERIOD, RESTARTS = 15.0, 3.0
"""A preemption every 15 s, or every 3 restarts' time if that is longer (a busy machine), so that most of a
start trains and the restart does not decide everything."""
FIXED = (0.1, 0.02, 0.4)
"""The fixed intervals, as shares of the period: 1.5, 0.3 and 6 s for a preemption every 15 s (quick: the first)."""
BATCH = ["trainer.global_batch_size=8", "trainer.micro_batch_size=8"]


def stop_at_first_step(launch: Launch) -> None:
    """The start after the last preemption: its ledger line says where it resumed; then it is not needed."""
    if launch.wait_for(launch.steps, 300) != "hit":
        raise RuntimeError(f"the last start exited or hung before its first step:\n{common.tail(launch.log)}")
    launch.kill()


def play(every: str, config: Path, overrides: list[str], runs: Path, plan: schedule.Schedule,
         window: int) -> dict:
    """One run preempted on `plan`; its steady-state goodput, measured and predicted, and its costs."""
    settings = [*overrides, f"checkpoint.every_seconds={every}"]
    name = f"every-{every}"
    done = schedule.play(lambda: Launch(common.train_cmd(0, name, runs, *settings, config=config), runs / name),
                         plan, 0.0, stop_at_first_step, echo=lambda line: print(f"  {every}: {line}", flush=True))
    steady = range(1, window + 1)
    g = account(runs / name / "metrics", steady, killed=schedule.killed(done))
    if g["starts"] != window:
        raise RuntimeError(f"{every}: {g['starts']} starts in the ledger's window, expected {window}")
    costs = schedule.measure(runs / name, g, steady)
    if costs.interval_s is None and every != "auto":  # no start lived through two saves: the setting
        costs = replace(costs, interval_s=float(every))
    mtbf, restarting = g["wall"] / window, g["parts"]["startup"] + g["parts"]["lease"]
    predicted = schedule.predict(costs, g["wall"], g["starts"], kills=window, terms=0)
    between = None if costs.save_s is None else \
        1 - lost_share(costs.save_s, costs.interval_s, 0.0, mtbf - costs.restart_s)  # the same, without restarts
    share = {part: seconds / g["wall"] for part, seconds in g["parts"].items()}
    print(f"{every:>6}: goodput {100 * g['goodput']:.1f} %, predicted "
          + ("-" if predicted is None else f"{100 * predicted:.1f} %") + f"; {costs}; a kill every "
          f"{mtbf:.1f} s; {len(done)} kills in all", flush=True)
    return {"goodput": g["goodput"], "predicted": predicted, "costs": costs, "share": share, "mtbf_s": mtbf,
            "between": g["parts"]["productive"] / (g["wall"] - restarting), "predicted_between": between}


def warm_restart(config: Path, overrides: list[str], runs: Path) -> float:
    """Seconds from launch to first step of a start that resumes this model's checkpoint (after a first start,
    which also warms the caches)."""
    for steps in (2, 3):
        common.finish(Launch(common.train_cmd(0, "warm-up", runs, *overrides, f"trainer.max_steps={steps}",
                                              config=config), runs / "warm-up"))
    g = account(runs / "warm-up" / "metrics", range(1, 2))
    return g["parts"]["startup"] + g["parts"]["lease"]


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--period", type=float, help=f"seconds between preemptions (default: {PERIOD:g}, or "
                   f"{RESTARTS:g} restarts where a restart takes longer, on a busy machine; quick: 10)")
    args = p.parse_args()
    if args.quick:
        config, model, window, shares = common.TINY, [], 1, FIXED[:1]
    else:
        config, model, window, shares = common.DEMO, BATCH, 3, FIXED
    base = [*model, "trainer.log_every=1", "trainer.eval_every=0", "checkpoint.every_steps=0",
            "checkpoint.async=false", "telemetry.system_every_s=0"]
    noise, measured = common.Noise(wait=not args.quick), {}
    with common.runs_folder() as tmp:
        period = args.period or 10.0
        if not args.quick and not args.period:
            noise.settle()
            warm = warm_restart(config, base, Path(tmp))
            period = max(PERIOD, round(RESTARTS * warm))
            print(f"a restart takes {warm:.1f} s: a preemption every {period:g} s", flush=True)
        fixed = [f"{period * share:.2g}" for share in shares]
        overrides = [*base, "trainer.max_steps=1000000", f"checkpoint.min_seconds={period / 30:g}",
                     f"checkpoint.max_seconds={period:g}"]
        plan = schedule.Schedule(period, "kill", jitter=0.5, seed=0, limit=window + 1)
        for every in [fixed[0], "auto", *fixed[1:]]:  # auto between two fixed intervals, not first or last
            noise.settle()
            measured[every] = play(every, config, overrides, Path(tmp), plan, window)
    results = {f"{t} s": measured[t] for t in sorted(fixed, key=float)} | {"auto": measured["auto"]}

    fixed_labels = [label for label in results if label != "auto"]
    best = max(fixed_labels, key=lambda label: results[label]["between"])
    auto, top = results["auto"], results[best]
    errors = [r["goodput"] - r["predicted"] for r in results.values() if r["predicted"] is not None]
    costs = [r["costs"].save_s for r in results.values() if r["costs"].save_s is not None]
    cost = common.median(costs) if costs else None
    restart = common.median([r["costs"].restart_s for r in results.values()])
    print(f"best fixed interval {best}: {100 * top['between']:.1f} % of the time between restarts; auto "
          f"{100 * auto['between']:.1f} % ({100 * (auto['between'] - top['between']):+.1f} points)")
    interval = unbounded = kill = term = None
    notes = []
    if restart > period / 3:
        notes.append(f"a restart took {restart:.1f} s, more than a third of the {period:g} s period: the machine was "
                     "busy; the restart dominates and steps are coarse against the intervals (try --period)")
    if cost is None:
        notes.append("no save was measured in the steady state: the period is too short for this machine now")
    else:
        bounds = CheckpointConfig()
        interval = young_daly(cost, HALF_HOUR, bounds.min_seconds, bounds.max_seconds)
        unbounded = young_daly(cost, HALF_HOUR, 0, HALF_HOUR)
        kill = 1 - lost_share(cost, interval, restart, HALF_HOUR, kill_share=1.0)
        term = 1 - lost_share(cost, interval, restart + cost, HALF_HOUR, kill_share=0.0)  # + the final save
        notes.append(f"at one preemption per 30 minutes, from the measured save cost {cost:.2f} s and restart "
                     f"{restart:.2f} s with auto's interval ({interval:.0f} s; Young–Daly's {unbounded:.0f} s within the default "
                     f"bounds {bounds.min_seconds:g}..{bounds.max_seconds:g} s): goodput {100 * kill:.1f} % if every "
                     f"preemption is a SIGKILL, {100 * term:.1f} % if each is a SIGTERM with a final checkpoint")
        print(notes[-1])

    figures: dict[str, object] = {
        "period_s": period, "preemptions_per_run": window + 1, "steady_starts_per_run": window,
        "best_fixed_interval": best, "auto_interval_s": auto["costs"].interval_s, "save_cost_s": cost, "restart_cost_s": restart,
        "interval_at_30_min_s": interval, "young_daly_at_30_min_s": unbounded, "goodput_at_30_min_sigkill_share": kill,
        "goodput_at_30_min_sigterm_share": term,
        "goodput_share": {label: r["goodput"] for label, r in results.items()},
        "predicted_goodput_share": {label: r["predicted"] for label, r in results.items()},
        "between_restarts_share": {label: r["between"] for label, r in results.items()},
        "predicted_between_restarts_share": {label: r["predicted_between"] for label, r in results.items()},
        "interval_s": {label: r["costs"].interval_s for label, r in results.items()},
        "restart_s": {label: r["costs"].restart_s for label, r in results.items()},
        "between_kills_s": {label: r["mtbf_s"] for label, r in results.items()},
        **{f"{part}_share": {label: r["share"][part] for label, r in results.items()}
           for part in ("redone", "checkpoint", "startup")},
    }
    checks = [
        common.check("auto − best fixed interval, goodput between restarts",
                     100 * (auto["between"] - top["between"]), "points", at_least=-3),
        common.check("auto ÷ best fixed interval, goodput between restarts", auto["between"] / top["between"]),
        common.check("auto − best fixed interval, goodput", 100 * (auto["goodput"] - top["goodput"]), "points"),
        common.check("measured − predicted goodput, median absolute error",
                     100 * common.median([abs(e) for e in errors]) if errors else None, "points", at_most=5),
        common.check("measured − predicted goodput, largest error", 100 * max(errors, key=abs) if errors else None,
                     "points"),
    ]
    setup = (f"{config.name}{' with 8 sequences a step' if model else ''}, one process, synchronous saves; a "
             f"SIGKILL every {period:g} s "
             f"(± 50 %), {window + 1} per run; steady state: starts 1..{window}")
    common.write_results(args.out, "goodput", args.quick, setup, figures, checks, notes, noise)


if __name__ == "__main__":
    main()
