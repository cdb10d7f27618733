"""Can a run checkpoint every step? Tokens/s with `checkpoint.every_steps: 1` against no periodic checkpoint.

- every: configs/demo.yaml on 2 ranks (torchrun, gloo, CPU) with `checkpoint.every_steps=1`: every step
  boundary starts an asynchronous save, or skips it while the previous one is still written (the loop
  never waits for a periodic write; docs/checkpoints.md).
- off: the same run with `checkpoint.every_steps=0 checkpoint.every_seconds=0` (only the final save).
- Same steps; tokens/s from the wall-clock `time` of metrics/train.jsonl at the end of warm-up step W and
  at the last step N (the final save, after step N, is not counted). Runs alternate (off, every, every,
  off, ...); the ratio is the median over repetitions of every ÷ off within each (two runs side by side,
  under the same load from other processes); medians of each mode are shown too. Goal: ≥ 0.95.
- Also from the `every` runs' metrics/checkpoint.jsonl: the saves committed and skipped (periodic ones,
  steps W+1..N), and per committed save the step-loop stall (`stall_s`) and the background write (`write_s`).

Run: `make bench`, or `.venv/bin/python bench/checkpoint_every_step.py [--quick]`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import common

MODES = {"off": ["checkpoint.every_steps=0", "checkpoint.every_seconds=0"],
         "every": ["checkpoint.every_steps=1", "checkpoint.every_seconds=0"]}


def one_run(config: Path, overrides: list[str], runs: Path, name: str, warmup: int) -> dict:
    """Tokens/s over steps warmup+1..N, and the periodic saves of that window."""
    cmd = common.train_cmd(2, name, runs, *overrides, config=config)
    for attempt in (1, 2):  # a shared machine: another job's start can collide with streaming's shared memory
        shutil.rmtree(runs / name, ignore_errors=True)  # a fresh run each time, never a resumed one
        try:
            common.finish(common.start(cmd, runs / name)[0])
            break
        except RuntimeError:
            if attempt == 2:
                raise
    lines = {r["step"]: r for r in common.read_jsonl(runs / name / "metrics" / "train.jsonl")}
    first, last = lines[warmup], lines[max(lines)]
    saves = [s for s in common.read_jsonl(runs / name / "metrics" / "checkpoint.jsonl")
             if warmup < s["step"] < last["step"]]  # periodic saves only: the final one follows step N
    return {"tokens_per_s": (last["tokens_seen"] - first["tokens_seen"]) / (last["time"] - first["time"]),
            "steps": last["step"] - warmup, "committed": [s for s in saves if s["ok"]],
            "skipped": sum(s.get("skipped", 0) for s in saves), "loss": last["loss"]}


def parts(config: Path, folder: Path, repeats: int) -> dict[str, float]:
    """Where one save of `config`'s state goes, part by part, measured side by side in this process (one torch
    thread, as each of 2 ranks on 2 cores has): medians of `repeats`, seconds."""
    import hashlib
    import io
    import time

    import torch
    import xxhash
    from torch.utils.serialization import config as serialization

    from prefix import config as configuration
    from prefix.checkpoint import checksums, files
    from prefix.checkpoint.snapshot import Snapshot
    from prefix.model import GPT

    torch.set_num_threads(1)
    cfg = configuration.load(config, [*common.QUIET])
    model = GPT(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.trainer.lr)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": cfg.to_dict()}
    snapshot, data = Snapshot(), io.BytesIO()
    torch.save(state, data)
    data = data.getvalue()

    def crc32(on: bool):
        def save() -> None:
            with serialization.patch({"save.compute_crc32": on}):
                torch.save(state, io.BytesIO())
        return save

    timed = {"snapshot_take_s": lambda: snapshot.take(state), "snapshot_copy_s": snapshot.fill,
             "torch_save_crc32_s": crc32(True), "torch_save_s": crc32(False),
             "sha256_s": lambda: hashlib.sha256(data).hexdigest(), "xxh3_s": lambda: xxhash.xxh3_128(data).hexdigest(),
             "write_xxh3_fsync_s": lambda: files.write_durably(state, folder / "part.pt"),
             "manifest_s": lambda: files.write_manifest(folder, 1, 2, {"global": checksums.file_sum(folder / "part.pt")})}
    found: dict[str, list[float]] = {name: [] for name in timed}
    for _ in range(repeats):
        for name, fn in timed.items():
            begin = time.perf_counter()
            fn()
            found[name].append(time.perf_counter() - begin)
        for manifest in folder.glob("manifest-*.json"):
            manifest.unlink()
    return {"state_bytes": len(data), **{name: common.median(times) for name, times in found.items()}}


def main() -> None:
    args = common.parser(__doc__).parse_args()
    if args.quick:
        config, steps, warmup, reps = common.TINY, 12, 4, 1
    else:
        config, steps, warmup, reps = common.DEMO, 60, 10, 5
    shared = [f"trainer.max_steps={steps}", f"trainer.log_every={warmup}", "trainer.eval_every=0",
              "telemetry.system_every_s=0"]
    results: dict[str, list[dict]] = {mode: [] for mode in MODES}
    noise = common.Noise(wait=not args.quick)
    with common.runs_folder() as tmp:
        part = parts(config, Path(tmp), 3 if args.quick else 15)
        for rep in range(reps):
            order = list(MODES) if rep % 2 == 0 else list(reversed(MODES))
            for mode in order:
                noise.settle()
                results[mode].append(one_run(config, [*shared, *MODES[mode]], Path(tmp), f"{mode}{rep}", warmup))
            print(f"rep {rep + 1}/{reps}: " + ", ".join(
                f"{m} {results[m][-1]['tokens_per_s']:,.0f} tokens/s" for m in MODES), flush=True)
    rate = {mode: common.median([r["tokens_per_s"] for r in runs]) for mode, runs in results.items()}
    paired = common.median([e["tokens_per_s"] / o["tokens_per_s"] for o, e in zip(results["off"], results["every"],
                                                                                   strict=True)])
    every = results["every"]
    committed = [s for r in every for s in r["committed"]]
    boundaries = sum(r["steps"] for r in every) - len(every)  # boundaries W+1..N-1: each asks for a save
    skipped = sum(r["skipped"] for r in every)
    figures: dict[str, object] = {
        "off_tokens_per_s": rate["off"], "every_tokens_per_s": rate["every"],
        **{f"{m}_runs_tokens_per_s": [r["tokens_per_s"] for r in runs] for m, runs in results.items()},
        "saves_committed": len(committed), "saves_skipped": skipped, "save_boundaries": boundaries,
        "stall_s": common.median([s["stall_s"] for s in committed]) if committed else None,
        "write_s": common.median([s["write_s"] for s in committed]) if committed else None,
        "rank0_checkpoint_bytes": committed[0]["bytes"] if committed else None,
        "steps": steps, "warmup_steps": warmup, "repetitions": reps, **part,
        "same_loss": all(abs(a["loss"] - b["loss"]) < 1e-6 for a, b in zip(results["off"], every, strict=True))}
    print(f"{config.name}, 2 ranks, steps {warmup + 1}..{steps}: every step {rate['every']:,.0f} tokens/s, no periodic "
          f"checkpoint {rate['off']:,.0f} tokens/s; {len(committed)} saves committed, {skipped} skipped")
    checks = [common.check("every_steps=1 ÷ no periodic checkpoint, tokens/s (median of paired runs)", paired,
                           at_least=0.95),
              common.check("every_steps=1 ÷ no periodic checkpoint, medians of tokens/s", rate["every"] / rate["off"]),
              common.check("step boundaries whose save was committed", 100 * len(committed) / max(boundaries, 1),
                           unit="%"),
              common.check("XXH3-128 ÷ SHA-256, hashing the state", part["xxh3_s"] / part["sha256_s"]),
              common.check("torch.save without ÷ with the zip's CRC-32", part["torch_save_s"] / part["torch_save_crc32_s"])]
    notes = [] if figures["same_loss"] else ["the runs ended at different losses: they did not do the same work"]
    setup = (f"{config.name}, 2 ranks on the CPU (torchrun, gloo), {steps} steps, tokens/s over steps {warmup + 1}.."
             f"{steps}, {reps} repetitions in alternating order; medians")
    common.write_results(args.out, "checkpoint_every_step", args.quick, setup, figures, checks, notes, noise)


if __name__ == "__main__":
    main()
