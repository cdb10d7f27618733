"""What does `trainer.parallelism: fsdp` cost against DDP: throughput, checkpoint stall, resume with resharding?

Sharding the weights, gradients and AdamW state (FSDP2, prefix/sharding.py) trades memory for
communication, and its checkpoints are sharded DCP folders (prefix/checkpoint/sharded.py). Three ratios,
all measured here side by side, on 2 ranks (torchrun, gloo on the CPU) unless said otherwise:

1. Throughput: the same run with `trainer.parallelism=fsdp` and `=ddp`, a synchronous checkpoint every K
   steps; tokens/s of a run is the median of its metrics/train.jsonl `tokens_per_sec` (a line per step) over
   the steps after the first W that include no save. Runs alternate (ddp, fsdp; fsdp, ddp; ...); medians of
   the runs. Goal: fsdp ÷ ddp ≥ 0.9.
2. Checkpoint stall: `stall_s` of the periodic sharded saves (metrics/checkpoint.jsonl; the final save,
   synchronous by design, left out) of the fsdp run above (`checkpoint.async=false`: the loop blocks for the
   whole DCP save) and of a third run, fsdp with `checkpoint.async=true` (a snapshot, then DCP writes from a
   thread), same steps and interval. Goal: async stall ÷ synchronous save ≤ 0.1.
3. Resume with resharding: one process (world size 1) resumes the 2-rank asynchronous run's last checkpoint
   (DCP reshards it on load) and trains a step, against a fresh one-process fsdp start of the same config;
   launch → first "step" log line, as bench/resume_latency.py measures it (its `launch_to_step`). Goal: ≤ 1.2,
   that benchmark's goal for a resume at the same world size.

Model: configs/demo.yaml with d_model 256 (3.3M parameters, 4 layers) and 4096 tokens per forward pass (16
sequences of 256, no accumulation), as a GPU job has thousands per micro-batch: FSDP's cost is the per-block
all-gathers and reduce-scatters, proportional to the weights, against compute proportional to the tokens.
With 1024 tokens per forward pass (demo.yaml's 8 × 128, accumulation 2) the same pair measured 0.76× on
2 cores (docs/scale.md). Run: `make bench`, or `.venv/bin/python bench/fsdp.py [--quick]`.
"""

from __future__ import annotations

from pathlib import Path

import common
from resume_latency import launch_to_step

MODEL = ("model.d_model=256", "model.seq_len=256", "trainer.micro_batch_size=16", "trainer.global_batch_size=32")


def two_ranks(config: Path, overrides: list[str], runs: Path, name: str, steps: int, every: int) -> dict:
    """A 2-rank run of prefix.train to its end: its periodic saves, and per step its log line."""
    launch, _ = common.start(common.train_cmd(2, name, runs, *overrides, config=config), runs / name)
    common.finish(launch)
    saves = [s for s in common.checkpoint_saves(runs / name) if s["step"] < steps]  # the final save is sync
    if len(saves) != (steps - 1) // every:
        raise RuntimeError(f"{name}: expected {(steps - 1) // every} periodic saves, the run logged {saves}")
    return {"saves": saves, "lines": common.read_jsonl(runs / name / "metrics" / "train.jsonl")}


def main() -> None:
    args = common.parser(__doc__).parse_args()
    if args.quick:
        config, model, steps, warmup, every, reps = common.TINY, [], 6, 1, 2, 1
    else:
        config, model, steps, warmup, every, reps = common.DEMO, list(MODEL), 16, 4, 4, 3
    shared = [*model, "trainer.parallelism=fsdp", "trainer.log_every=1", "trainer.eval_every=0",
              f"checkpoint.every_steps={every}", "checkpoint.every_seconds=0", "telemetry.system_every_s=0"]
    modes = {"ddp": ["trainer.parallelism=ddp", "checkpoint.async=false"], "fsdp": ["checkpoint.async=false"]}
    rate: dict[str, list[float]] = {m: [] for m in modes}
    loss: dict[str, list[float]] = {m: [] for m in modes}
    stall: dict[str, list[float]] = {"sync": [], "async": []}
    written, flags, fresh, resumed = [], set(), [], []
    noise, notes = common.Noise(wait=not args.quick), []
    with common.runs_folder() as tmp:
        runs = Path(tmp)
        for rep in range(reps):
            for mode in list(modes)[::1 if rep % 2 == 0 else -1]:
                noise.settle()
                run = two_ranks(config, [*shared, *modes[mode], f"trainer.max_steps={steps}"], runs, f"{mode}{rep}",
                                steps, every)
                rate[mode].append(common.median([r["tokens_per_sec"] for r in run["lines"]
                                                 if r["step"] > warmup and (r["step"] - 1) % every]))
                loss[mode].append(run["lines"][-1]["loss"])
                stall["sync"] += [s["stall_s"] for s in run["saves"]] if mode == "fsdp" else []
            noise.settle()
            run = two_ranks(config, [*shared, "checkpoint.async=true", f"trainer.max_steps={steps}"], runs,
                            f"async{rep}", steps, every)
            stall["async"] += [s["stall_s"] for s in run["saves"]]
            written += [s["write_s"] for s in run["saves"]]
            flags |= {s.get("async") for s in run["saves"]}
            noise.settle()  # 1 process: a fresh start, then a resume of the 2-rank asynchronous run's checkpoint
            fresh.append(launch_to_step(config, [*shared, "trainer.max_steps=2"], runs, f"fresh{rep}"))
            noise.settle()
            resumed.append(launch_to_step(config, [*shared, f"trainer.max_steps={steps + 2}"], runs, f"async{rep}"))
            if fresh[-1]["resumed"] or not resumed[-1]["resumed"]:
                raise RuntimeError(f"rep {rep}: the fresh start resumed or the 1-rank restart did not")
            print(f"rep {rep + 1}/{reps}: tokens/s ddp {rate['ddp'][-1]:,.0f}, fsdp {rate['fsdp'][-1]:,.0f}; "
                  f"fsdp stall sync {stall['sync'][-1]:.3f} s, async {stall['async'][-1]:.3f} s; launch → first step "
                  f"(1 process) fresh {fresh[-1]['step']:.2f} s, resuming 2 ranks' {resumed[-1]['step']:.2f} s",
                  flush=True)
        params = common.events(runs / "fsdp0", "model")[0]["params"]
        state_bytes = common.checkpoint_saves(runs / "fsdp0")[0]["bytes"]
    figures: dict[str, object] = {
        "params": params, "ddp_tokens_per_s": common.median(rate["ddp"]),
        "fsdp_tokens_per_s": common.median(rate["fsdp"]),
        **{f"{m}_runs_tokens_per_s": rate[m] for m in rate},
        "loss_at_last_step": loss["fsdp"][0], "same_loss": all(
            abs(d - f) < 1e-4 for d, f in zip(loss["ddp"], loss["fsdp"], strict=True)),
        "rank0_checkpoint_bytes": state_bytes, "sync_save_s": common.median(stall["sync"]),
        "async_stall_s": common.median(stall["async"]), "async_write_s": common.median(written),
        "periodic_saves_per_mode": len(stall["sync"]),
        "fresh_launch_to_first_step_s": common.median([r["step"] for r in fresh]),
        "reshard_resume_launch_to_first_step_s": common.median([r["step"] for r in resumed]),
        "reshard_resume_launch_to_model_s": common.median([r["model"] for r in resumed]),
        "steps": steps, "warmup_steps": warmup, "repetitions": reps}
    if flags != {True}:
        notes.append(f"checkpoint.async=true runs logged async={sorted(map(str, flags))}, not all true")
    if not figures["same_loss"]:
        notes.append(f"fsdp and ddp ended at different losses ({loss['fsdp']} vs {loss['ddp']})")
    ratios = {"throughput": figures["fsdp_tokens_per_s"] / figures["ddp_tokens_per_s"],
              "stall": figures["async_stall_s"] / figures["sync_save_s"],
              "resume": figures["reshard_resume_launch_to_first_step_s"] / figures["fresh_launch_to_first_step_s"]}
    print(f"{config.name} ({params / 1e6:.1f}M parameters), 2 ranks: ddp {figures['ddp_tokens_per_s']:,.0f}, fsdp "
          f"{figures['fsdp_tokens_per_s']:,.0f} tokens/s; sharded save {figures['sync_save_s']:.3f} s synchronous, "
          f"async stall {figures['async_stall_s']:.3f} s; 1 process, launch → first step: fresh "
          f"{figures['fresh_launch_to_first_step_s']:.2f} s, resuming 2 ranks' checkpoint "
          f"{figures['reshard_resume_launch_to_first_step_s']:.2f} s")
    checks = [common.check("fsdp ÷ ddp, tokens/s (2 ranks)", ratios["throughput"], at_least=0.9),
              common.check("fsdp: async checkpoint stall ÷ synchronous sharded save", ratios["stall"], at_most=0.1),
              common.check("1 process resuming a 2-rank fsdp checkpoint ÷ fresh start, launch → first step",
                           ratios["resume"], at_most=1.2)]
    setup = (f"{config.name}{' with ' + ' '.join(model) if model else ''} ({params / 1e6:.1f}M parameters), 2 ranks on "
             f"the CPU (gloo), {steps} steps, a checkpoint every {every} steps, tokens/s of steps {warmup + 1}..{steps} "
             f"without a save; {reps} repetitions (ddp and fsdp in alternating order, async, then 1-process fresh "
             "and resume); medians")
    common.write_results(args.out, "fsdp", args.quick, setup, figures, checks, notes, noise)


if __name__ == "__main__":
    main()
