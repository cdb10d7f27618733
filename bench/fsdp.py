"""What does `trainer.parallelism: fsdp` cost against DDP: throughput, checkpoint stall, resume with resharding?

Sharding the weights, gradients and AdamW state (FSDP2, prefix/sharding.py) trades memory for
communication, and its checkpoints are sharded DCP folders (prefix/checkpoint/sharded.py). Three ratios,
all measured here side by side, on 2 ranks (torchrun, gloo on the CPU) unless said otherwise:

1. Throughput: the same run with `trainer.parallelism=fsdp` and `=ddp`, no checkpoints; tokens/s of a run
   is the median of its metrics/train.jsonl `tokens_per_sec` (a line per step) after the first W steps.
   Runs alternate (ddp, fsdp; fsdp, ddp; ...); medians of the runs. Goal: fsdp ÷ ddp ≥ 0.9.
2. Checkpoint stall: fsdp runs with a periodic sharded checkpoint every K steps, `checkpoint.async=true`
   (snapshot, then DCP writes from a thread) and `=false` (the loop blocks for the whole synchronous save);
   `stall_s` of the periodic saves in metrics/checkpoint.jsonl (the final save, synchronous by design, is
   left out). Goal: async stall ÷ synchronous save ≤ 0.1.
3. Resume with resharding: one process (world size 1) resumes the 2-rank asynchronous run's last checkpoint
   (DCP reshards it on load) and trains a step, against a fresh one-process fsdp start of the same config;
   launch → first "step" log line, as bench/resume_latency.py measures it (its `launch_to_step`). Goal: ≤ 1.2,
   that benchmark's goal for a resume at the same world size.

Model: configs/demo.yaml with d_model 256 (3.2M parameters, 4 layers), so compute is not negligible against
the per-block all-gathers. Run: `make bench`, or `.venv/bin/python bench/fsdp.py [--quick]`.
"""

from __future__ import annotations

from pathlib import Path

import common
from resume_latency import launch_to_step


def two_ranks(config: Path, overrides: list[str], runs: Path, name: str) -> Path:
    """A 2-rank run of prefix.train to its end; its run directory."""
    launch, _ = common.start(common.train_cmd(2, name, runs, *overrides, config=config), runs / name)
    common.finish(launch)
    return runs / name


def tokens_per_s(run: Path, warmup: int) -> tuple[float, float]:
    """Median tokens/s of the steps after `warmup`, and the loss at the last step."""
    lines = common.read_jsonl(run / "metrics" / "train.jsonl")
    return common.median([r["tokens_per_sec"] for r in lines if r["step"] > warmup]), lines[-1]["loss"]


def main() -> None:
    args = common.parser(__doc__).parse_args()
    if args.quick:
        config, model, steps, warmup, every, reps = common.TINY, [], 6, 2, 2, 1
    else:
        config, model, steps, warmup, every, reps = common.DEMO, ["model.d_model=256"], 14, 4, 3, 3
    base = [*model, "trainer.parallelism=fsdp", "trainer.log_every=1", "trainer.eval_every=0",
            "checkpoint.every_seconds=0", "telemetry.system_every_s=0"]
    plain = [*base, "checkpoint.every_steps=0", f"trainer.max_steps={steps}"]
    saving = [*base, f"checkpoint.every_steps={every}"]
    rate: dict[str, list[float]] = {"ddp": [], "fsdp": []}
    loss: dict[str, list[float]] = {"ddp": [], "fsdp": []}
    stall: dict[str, list[float]] = {"sync": [], "async": []}
    written, flags, fresh, resumed = [], set(), [], []
    noise, notes = common.Noise(wait=not args.quick), []
    with common.runs_folder() as tmp:
        runs = Path(tmp)
        for rep in range(reps):
            for mode in ("ddp", "fsdp") if rep % 2 == 0 else ("fsdp", "ddp"):
                noise.settle()
                run = two_ranks(config, [*plain, f"trainer.parallelism={mode}"], runs, f"{mode}{rep}")
                for into, value in zip((rate, loss), tokens_per_s(run, warmup), strict=True):
                    into[mode].append(value)
            for mode in ("sync", "async") if rep % 2 == 0 else ("async", "sync"):
                noise.settle()
                run = two_ranks(config, [*saving, f"checkpoint.async={str(mode == 'async').lower()}",
                                         f"trainer.max_steps={steps}"], runs, f"{mode}{rep}")
                saves = [s for s in common.checkpoint_saves(run) if s["step"] < steps]
                if len(saves) != (steps - 1) // every:
                    raise RuntimeError(f"{mode}{rep}: expected {(steps - 1) // every} periodic saves, got {saves}")
                stall[mode] += [s["stall_s"] for s in saves]
                if mode == "async":
                    written += [s["write_s"] for s in saves]
                    flags |= {s.get("async") for s in saves}
            noise.settle()  # 1 process: a fresh start, then a resume of the 2-rank asynchronous run's checkpoint
            fresh.append(launch_to_step(config, [*saving, "trainer.max_steps=2"], runs, f"fresh{rep}"))
            noise.settle()
            resumed.append(launch_to_step(config, [*saving, f"trainer.max_steps={steps + 2}"], runs, f"async{rep}"))
            if fresh[-1]["resumed"] or not resumed[-1]["resumed"]:
                raise RuntimeError(f"rep {rep}: the fresh start resumed or the 1-rank restart did not")
            print(f"rep {rep + 1}/{reps}: tokens/s ddp {rate['ddp'][-1]:,.0f}, fsdp {rate['fsdp'][-1]:,.0f}; stall sync "
                  f"{common.median(stall['sync'][-len(saves):]):.3f} s, async "
                  f"{common.median(stall['async'][-len(saves):]):.3f} s; launch → first step (1 process) fresh "
                  f"{fresh[-1]['step']:.2f} s, resume from 2 ranks {resumed[-1]['step']:.2f} s", flush=True)
        params = common.events(runs / "fsdp0", "model")[0]["params"]
        state_bytes = sum(s["bytes"] for s in common.checkpoint_saves(runs / "sync0")[:1])
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
    setup = (f"{config.name}{' with d_model 256' if model else ''} ({params / 1e6:.1f}M parameters), 2 ranks on "
             f"the CPU (gloo), {steps} steps, tokens/s of steps {warmup + 1}..{steps}, a checkpoint every {every} "
             f"steps in the save runs, {reps} repetitions alternating the order of each pair; medians")
    common.write_results(args.out, "fsdp", args.quick, setup, figures, checks, notes, noise)


if __name__ == "__main__":
    main()
