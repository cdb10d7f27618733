"""What does the daemon cost? Tokens/s of prefix.train against a bare training loop, side by side.

- prefix: `python -m prefix.train` (one process) with everything on: metrics (a line every 10 steps,
  TensorBoard), heartbeat, the preemption poll, system telemetry every 10 s, a periodic checkpoint every
  20 steps (asynchronous where the daemon does that). Tokens/s from the wall-clock `time` of its
  metrics/train.jsonl lines at the end of warm-up step W and at the last step N.
- bare: a loop written here, in a fresh process: the same `prefix.model.GPT` and ModelConfig, AdamW with
  the same hyperparameters and schedule, the same micro-batches, accumulation, gradient clipping and steps;
  tokens/s over the same steps W+1..N. Two variants, both on the very micro-batches the daemon's rank 0
  reads, in the same order (same seed and init too: all three report the same loss at step N):
  - streaming (the goal's reference): it reads them while it trains, from the same MDS dataset through the
    same loader the daemon uses (prefix.data.loader.TrainStream: streaming, one DataLoader worker). Same
    model, optimizer and data pipeline, so the ratio is what the daemon itself adds;
  - pre-loaded: the same batches read into memory before its clock starts, so it pays nothing for data: the
    ratio to it adds the cost of loading data while training (on 2 cores, a loader worker process competes
    with torch's two threads).
- Runs alternate in a rotating order (pre-loaded, streaming, prefix; streaming, prefix, pre-loaded; ...);
  medians. Goal: prefix ÷ bare (streaming) ≥ 0.97.

Run: `make bench`, or `.venv/bin/python bench/train_vs_bare.py [--quick]`.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import common


def bare(config: str, overrides: list[str], warmup: int, streaming: bool) -> dict[str, float]:
    """The bare loop (run in its own process): tokens/s over steps warmup+1..max_steps, and the last loss."""
    import torch

    from prefix import config as configuration
    from prefix.data import streams
    from prefix.data.loader import TrainStream
    from prefix.distributed import World
    from prefix.model import GPT
    from prefix.telemetry import setup_logging

    cfg = configuration.load(config, overrides)
    t, steps = cfg.trainer, cfg.trainer.max_steps
    accum = t.global_batch_size // t.micro_batch_size
    stream = TrainStream(cfg, streams.resolve(cfg, World(), setup_logging(0)), accum)
    if not streaming:
        batches = [stream.next() for _ in range(steps * accum)]
        stream.close()

    torch.manual_seed(cfg.run.seed)
    model = GPT(cfg.model)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=t.lr, betas=(t.beta1, t.beta2))

    def lr(step: int) -> float:  # linear warm-up, cosine decay to min_lr
        if step < t.warmup_steps:
            return t.lr * (step + 1) / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, steps - t.warmup_steps))
        return t.min_lr + (t.lr - t.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))

    ends, loss_sum = [], torch.zeros(())
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr(step)
        loss_sum = torch.zeros(())
        for i in range(accum):
            micro = stream.next() if streaming else batches[step * accum + i]
            _, loss = model(micro.inputs, micro.targets)
            (loss / accum).backward()
            loss_sum += loss.detach()
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ends.append(time.perf_counter())
    stream.close()
    tokens = (steps - warmup) * t.global_batch_size * cfg.model.seq_len
    return {"tokens_per_s": tokens / (ends[-1] - ends[warmup - 1]), "loss": float(loss_sum / accum)}


def run_bare(config: Path, overrides: list[str], warmup: int, streaming: bool) -> dict[str, float]:
    job = json.dumps({"config": str(config), "overrides": overrides, "warmup": warmup, "streaming": streaming})
    out = subprocess.run([sys.executable, __file__, "--bare", job], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"bare loop failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_prefix(config: Path, overrides: list[str], warmup: int, runs: Path, name: str) -> dict[str, float]:
    launch, _ = common.start(common.train_cmd(0, name, runs, *overrides, config=config), runs / name)
    common.finish(launch)
    lines = {r["step"]: r for r in common.read_jsonl(runs / name / "metrics" / "train.jsonl")}
    first, last = lines[warmup], lines[max(lines)]
    rate = (last["tokens_seen"] - first["tokens_seen"]) / (last["time"] - first["time"])
    saves = len(common.checkpoint_saves(runs / name))
    return {"tokens_per_s": rate, "loss": last["loss"], "checkpoints": saves}


def main() -> None:
    args = common.parser(__doc__).parse_args()
    if args.quick:
        config, steps, warmup, reps, every = common.TINY, 12, 4, 1, 4
    else:
        config, steps, warmup, reps, every = common.DEMO, 40, 10, 5, 10  # runs differ more than steps do: many
    shared = [f"trainer.max_steps={steps}", f"trainer.log_every={every}", "trainer.eval_every=0"]
    daemon = [*shared, f"checkpoint.every_steps={2 * every}", "telemetry.system_every_s=10",
              "telemetry.tensorboard=true"]
    with common.runs_folder() as tmp:
        loops = {"preloaded": lambda rep: run_bare(config, [*common.QUIET, *shared], warmup, streaming=False),
                 "streaming": lambda rep: run_bare(config, [*common.QUIET, *shared], warmup, streaming=True),
                 "prefix": lambda rep: run_prefix(config, daemon, warmup, Path(tmp), f"tvb{rep}")}
        runs: dict[str, list[dict]] = {name: [] for name in loops}
        noise = common.Noise(wait=not args.quick)
        for rep in range(reps):
            order = list(loops)[rep % 3:] + list(loops)[:rep % 3]
            for name in order:
                noise.settle()
                runs[name].append(loops[name](rep))
            print(f"rep {rep + 1}/{reps}: " + ", ".join(f"{n} {runs[n][-1]['tokens_per_s']:,.0f}" for n in loops)
                  + " tokens/s", flush=True)
    rate = {name: common.median([r["tokens_per_s"] for r in results]) for name, results in runs.items()}
    losses = {name: results[0]["loss"] for name, results in runs.items()}
    same_loss = all(abs(r["loss"] - p["loss"]) < 1e-4 for name in ("preloaded", "streaming")
                    for r, p in zip(runs[name], runs["prefix"], strict=True))
    print(f"{config.name}, one process, steps {warmup + 1}..{steps}: prefix {rate['prefix']:,.0f}, bare streaming "
          f"{rate['streaming']:,.0f}, bare pre-loaded {rate['preloaded']:,.0f} tokens/s; loss at step {steps}: "
          + ", ".join(f"{n} {loss:.4f}" for n, loss in losses.items()))
    figures: dict[str, object] = {
        "prefix_tokens_per_s": rate["prefix"], "bare_streaming_tokens_per_s": rate["streaming"],
        "bare_preloaded_tokens_per_s": rate["preloaded"],
        **{f"{n}_runs_tokens_per_s": [r["tokens_per_s"] for r in results] for n, results in runs.items()},
        "steps": steps, "warmup_steps": warmup, "repetitions": reps,
        "checkpoints_in_prefix_run": runs["prefix"][0]["checkpoints"], "loss_at_last_step": losses["prefix"],
        "same_loss": same_loss}
    setup = (f"{config.name} (one process, {steps} steps, tokens/s over steps {warmup + 1}..{steps}, median of "
             f"{reps} runs each in rotating order); prefix with metrics every {every} steps, TensorBoard, heartbeat, "
             f"preemption poll, system telemetry and a checkpoint every {2 * every} steps")
    checks = [common.check("prefix ÷ bare loop with the same streaming loader, tokens/s",
                           rate["prefix"] / rate["streaming"], at_least=0.97),
              common.check("prefix ÷ bare loop on pre-loaded batches, tokens/s", rate["prefix"] / rate["preloaded"]),
              common.check("bare streaming ÷ bare pre-loaded, tokens/s", rate["streaming"] / rate["preloaded"])]
    notes = [] if same_loss else ["the loops ended at different losses: they did not do the same work"]
    common.write_results(args.out, "train_vs_bare", args.quick, setup, figures, checks, notes, noise)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--bare":
        job = json.loads(sys.argv[2])
        print(json.dumps(bare(job["config"], job["overrides"], job["warmup"], job["streaming"])))
    else:
        main()
