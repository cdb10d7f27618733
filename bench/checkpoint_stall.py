"""How long does a checkpoint block the step loop? Asynchronous vs synchronous saves vs a plain torch.save.

- prefix: `python -m prefix.train` (one process) with `checkpoint.async=true` and with `checkpoint.async=false`,
  a periodic checkpoint every few steps; `stall_s` (seconds the step loop was blocked) and `write_s` of each
  periodic save from its metrics/checkpoint.jsonl. The final save (synchronous by design) is left out.
- plain: what a bare training loop does, `torch.save({"model", "optimizer"})` of the same GPT and AdamW to the
  same disk (the run folder's), in this process; the whole save blocks such a loop. Also shown with an
  fsync after it, as the daemon's files are fsynced.
- Also per save: the step-loop time lost, the extra time of the steps from the save to the next one over the
  run's median step (metrics/train.jsonl, a line per step): an asynchronous write competes with training
  for the CPU cores, which its stall does not show.
- Model: configs/demo.yaml widened to 19.4M parameters (6 layers, d_model 512): model + AdamW moments are
  233 MB, so a save takes noticeable time. Runs alternate (plain, sync, async, plain, ...); medians.
Goal: the asynchronous stall under 10 % of the plain save.

A daemon that does not accept `checkpoint.async` yet (exit 2, unknown key) is measured as it is (its saves
are synchronous, read from its "checkpoint saved" log lines) and the asynchronous figure is "not available".

Run: `make bench`, or `.venv/bin/python bench/checkpoint_stall.py [--quick]`.
"""

from __future__ import annotations

from pathlib import Path

import common


def async_accepted() -> bool:
    from prefix import config

    try:
        config.load(common.DEMO, ["checkpoint.async=true"])
    except config.ConfigError:
        return False
    return True


def daemon_saves(config: Path, overrides: list[str], runs: Path, name: str, max_steps: int, every: int) -> list[dict]:
    """The run's periodic saves, each with `lost_s`: the step time, beyond the run's median step, of the steps
    from the save to the next one (for a synchronous save about its stall; for an asynchronous one its stall
    plus the steps slowed by the writer thread competing for the cores)."""
    launch, _ = common.start(common.train_cmd(0, name, runs, *overrides, config=config), runs / name)
    common.finish(launch)
    step_time = {r["step"]: r["step_time"] for r in common.read_jsonl(runs / name / "metrics" / "train.jsonl")}
    usual = common.median([t for step, t in step_time.items() if step > 1])
    saves = [s for s in common.checkpoint_saves(runs / name) if s["step"] < max_steps]  # the final save is sync
    for save in saves:
        save["lost_s"] = sum(step_time[i] - usual for i in range(save["step"] + 1, save["step"] + every + 1))
    return saves


def main() -> None:
    args = common.parser(__doc__).parse_args()
    if args.quick:
        config, model, every, saves, reps = common.TINY, [], 4, 2, 1
    else:
        config, model, every, saves, reps = common.DEMO, list(common.MEDIUM), 8, 3, 2
    max_steps = every * (saves + 1)
    shared = [*model, f"trainer.max_steps={max_steps}", f"checkpoint.every_steps={every}", "checkpoint.every_seconds=0",
              "trainer.eval_every=0", "trainer.log_every=1", "telemetry.system_every_s=0"]
    modes = {"sync": ["checkpoint.async=false"], "async": ["checkpoint.async=true"]}
    available = async_accepted()
    notes = []
    if not available:
        modes = {"sync": []}
        notes.append("checkpoint.async is not accepted by this prefix.train (unknown key): its saves are "
                     "synchronous; the asynchronous figures are not available")
    plain: list[float] = []
    plain_fsync: list[float] = []
    sha256: list[float] = []
    stalls: dict[str, list[float]] = {mode: [] for mode in modes}
    writes: dict[str, list[float]] = {mode: [] for mode in modes}
    lost: dict[str, list[float]] = {mode: [] for mode in modes}
    flags: dict[str, set] = {mode: set() for mode in modes}
    state: dict = {}
    noise = common.Noise(wait=not args.quick)
    with common.runs_folder() as tmp:
        runs = Path(tmp)
        for rep in range(reps):
            noise.settle()
            state = common.plain_save(config, [*common.QUIET, *model], runs, repeats=saves)
            plain += state["save_s"]
            plain_fsync += state["save_fsync_s"]
            sha256.append(state["sha256_s"])
            for mode, extra in modes.items():
                noise.settle()
                records = daemon_saves(config, [*shared, *extra], runs, f"{mode}{rep}", max_steps, every)
                if len(records) != saves:
                    raise RuntimeError(f"{mode}: expected {saves} periodic saves, the run logged {records}")
                stalls[mode] += [r["stall_s"] for r in records]
                writes[mode] += [r.get("write_s", r["stall_s"]) for r in records]
                lost[mode] += [r["lost_s"] for r in records]
                flags[mode] |= {r.get("async") for r in records}
            print(f"rep {rep + 1}/{reps}: plain save {common.median(state['save_s']):.3f} s, "
                  + ", ".join(f"{m} stall {common.median(stalls[m][-saves:]):.3f} s" for m in modes), flush=True)
    plain_s = common.median(plain)
    figures: dict[str, object] = {"state_bytes": state["bytes"], "params": state["params"],
                                  "plain_save_s": plain_s, "plain_save_fsync_s": common.median(plain_fsync),
                                  "sha256_of_state_s": common.median(sha256),
                                  "saves_per_mode": saves * reps, "async_available": available}
    for mode in ("sync", "async"):
        measured = mode in stalls
        figures[f"{mode}_stall_s"] = common.median(stalls[mode]) if measured else None
        figures[f"{mode}_write_s"] = common.median(writes[mode]) if measured else None
        figures[f"{mode}_loop_lost_s"] = common.median(lost[mode]) if measured else None
    if available and flags["async"] != {True}:
        notes.append(f"checkpoint.async=true runs logged async={sorted(map(str, flags['async']))}, not all true")
    sync_s, async_s = figures["sync_stall_s"], figures["async_stall_s"]
    print(f"{config.name} ({state['params'] / 1e6:.1f}M parameters, {state['bytes'] / 1e6:.0f} MB of model + AdamW): "
          f"plain torch.save {plain_s:.3f} s (with fsync {figures['plain_save_fsync_s']:.3f} s), step loop blocked "
          f"by a sync save {sync_s:.3f} s, by an async save "
          + ("not available" if async_s is None else f"{async_s:.3f} s"))
    checks = [common.check("async stall ÷ plain torch.save", None if async_s is None else async_s / plain_s,
                           at_most=0.10),
              common.check("sync stall ÷ plain torch.save", sync_s / plain_s)]
    if async_s is not None:
        checks.insert(1, common.check("async: step-loop time lost (stall + slowed steps) ÷ plain torch.save",
                                      figures["async_loop_lost_s"] / plain_s))
    setup = (f"{common.model_name(config, model)}, one process, a checkpoint every {every} "
             f"steps, {saves} periodic saves per run, {reps} alternating repetitions (plain, sync, async); medians")
    common.write_results(args.out, "checkpoint_stall", args.quick, setup, figures, checks, notes, noise)


if __name__ == "__main__":
    main()
