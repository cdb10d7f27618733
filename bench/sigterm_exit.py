"""How long from a preemption's SIGTERM to a finished process with its final checkpoint on disk?

- prefix: `torchrun --nproc-per-node 2 -m prefix.train` (gloo, a pod's PID 1) of configs/demo.yaml widened
  to 19.4M parameters (233 MB of model + AdamW state), no periodic checkpoint; once step 3 is logged,
  SIGTERM to torchrun, then the seconds until torchrun exited. Checked afterwards: the log says "stopped by
  signal after final checkpoint" and checkpoints/latest.pt holds the last logged step.
- plain: `torch.save` of the same state (model + AdamW of the same GPT) to the same disk, in this process.
Goal: SIGTERM → exit at most 1.5× the plain save, and inside 30 s (torchrun's default shutdown timeout).
Repeated and alternated (plain, prefix, ...); medians. Then the same for configs/gpt2-124m.yaml when it
exists: one rank, one 64-token sequence per step (its 124M parameters are what a save costs), or, when a
step takes too long on this machine, the plain save of its state alone.

Run: `make bench`, or `.venv/bin/python bench/sigterm_exit.py [--quick]`.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import common

STEP_TIMEOUT = 240.0  # seconds from launch to the awaited step before a config is called too slow here


def sigterm_once(config: Path, overrides: list[str], nproc: int, runs: Path, name: str, step: int) -> dict:
    """Launch, SIGTERM after `step`, wait for the exit: seconds, and where the time went."""
    run_dir = runs / name
    launch, _ = common.start(common.train_cmd(nproc, name, runs, *overrides, config=config), run_dir)
    outcome = launch.wait_for(lambda: step <= max(launch.steps(), default=0), STEP_TIMEOUT)
    if outcome != "hit":
        launch.kill()
        raise TimeoutError(f"step {step} not reached in {STEP_TIMEOUT:.0f} s ({outcome}):\n{common.tail(launch.log)}")
    sent_wall, sent = time.time(), time.monotonic()
    launch.proc.send_signal(signal.SIGTERM)
    common.finish(launch, timeout=300, codes=(1, 143))  # torchrun exits 1 when its workers exit 143
    exit_s = time.monotonic() - sent
    stopped = common.events(run_dir, "stopped by signal after final checkpoint", since=sent_wall)
    if not stopped:
        raise RuntimeError(f"no final checkpoint after SIGTERM:\n{common.tail(launch.log)}")
    from prefix.state import TrainState

    last = max(launch.steps())
    saved = TrainState.load(run_dir / "checkpoints" / "latest.pt").step
    if saved != last:
        raise RuntimeError(f"latest.pt holds step {saved}, the last logged step is {last}")
    step_s = common.median([r["step_time"] for r in common.read_jsonl(run_dir / "metrics" / "train.jsonl")][1:])
    return {"exit_s": exit_s, "to_saved_s": stopped[0]["t"] - sent_wall, "step": last, "step_s": step_s}


def measure(config: Path, overrides: list[str], nproc: int, reps: int, runs: Path, label: str,
            noise: common.Noise) -> dict:
    plain, exits, saved, steps = [], [], [], []
    for rep in range(reps):
        noise.settle()
        state = common.plain_save(config, [*common.QUIET, *overrides], runs, repeats=1 if reps == 1 else 3)
        plain += state["save_s"]
        noise.settle()
        run = sigterm_once(config, overrides, nproc, runs, f"{label}{rep}", step=3)
        exits.append(run["exit_s"])
        saved.append(run["to_saved_s"])
        steps.append(run["step_s"])
        print(f"{label} rep {rep + 1}/{reps}: plain save {plain[-1]:.2f} s, SIGTERM → saved {saved[-1]:.2f} s, "
              f"→ exit {exits[-1]:.2f} s", flush=True)
    return {"params": state["params"], "state_bytes": state["bytes"], "plain_save_s": common.median(plain),
            "sigterm_to_saved_s": common.median(saved), "sigterm_to_exit_s": common.median(exits),
            "saved_to_exit_s": common.median([e - s for e, s in zip(exits, saved, strict=True)]),
            "step_s": common.median(steps)}  # a SIGTERM lands in a step, which finishes before the save


def checks_of(figures: dict, label: str = "") -> list[dict]:
    return [common.check(f"{label}SIGTERM → exit ÷ plain torch.save", figures["sigterm_to_exit_s"] / figures["plain_save_s"],
                         at_most=1.5),
            common.check(f"{label}SIGTERM → exit", figures["sigterm_to_exit_s"], unit="s", at_most=30),
            common.check(f"{label}SIGTERM → final checkpoint logged ÷ plain torch.save",
                         figures["sigterm_to_saved_s"] / figures["plain_save_s"])]


def gpt2(runs: Path, notes: list[str], noise: common.Noise) -> tuple[dict, list[dict]]:
    """configs/gpt2-124m.yaml shrunk per step (not per state) for a CPU; the plain save alone if too slow."""
    if not common.GPT2.is_file():
        notes.append("configs/gpt2-124m.yaml does not exist: skipped")
        return {}, []
    small = ["trainer.global_batch_size=1", "trainer.micro_batch_size=1", "model.seq_len=64", "data.num_workers=1",
             "trainer.eval_every=0", "trainer.log_every=1", "checkpoint.every_steps=0", "checkpoint.every_seconds=0",
             "telemetry.system_every_s=0"]
    try:
        figures = measure(common.GPT2, small, 1, 1, runs, "gpt2-", noise)
    except (TimeoutError, RuntimeError) as e:
        notes.append(f"gpt2-124m: the daemon was not measured ({str(e).splitlines()[0]}); its state's plain save only")
        state = common.plain_save(common.GPT2, [*common.QUIET, *small], runs, repeats=1)
        return {"gpt2_params": state["params"], "gpt2_state_bytes": state["bytes"],
                "gpt2_plain_save_s": state["save_s"][0]}, []
    notes.append("gpt2-124m: one rank, one 64-token sequence per step on this CPU; the state is the full 124M "
                 "model + AdamW")
    return {f"gpt2_{k}": v for k, v in figures.items()}, checks_of(figures, "gpt2-124m: ")


def main() -> None:
    args = common.parser(__doc__).parse_args()
    config, model, reps = (common.TINY, [], 1) if args.quick else (common.DEMO, list(common.MEDIUM), 2)
    overrides = [*model, "trainer.max_steps=1000", "trainer.log_every=1", "trainer.eval_every=0",
                 "checkpoint.every_steps=0", "checkpoint.every_seconds=0", "telemetry.system_every_s=0"]
    notes: list[str] = []
    noise = common.Noise(wait=not args.quick)
    with common.runs_folder() as tmp:
        figures = measure(config, overrides, 2, reps, Path(tmp), "sig", noise)
        checks = checks_of(figures)
        if not args.quick:
            extra, more = gpt2(Path(tmp), notes, noise)
            figures.update(extra)
            checks += more
    print(f"{config.name} ({figures['params'] / 1e6:.1f}M parameters, {figures['state_bytes'] / 1e6:.0f} MB), 2 ranks "
          f"under torchrun: SIGTERM → final checkpoint {figures['sigterm_to_saved_s']:.2f} s, → exit "
          f"{figures['sigterm_to_exit_s']:.2f} s; plain torch.save {figures['plain_save_s']:.2f} s")
    setup = (f"{common.model_name(config, model)}, torchrun 2 ranks (gloo), SIGTERM to "
             f"torchrun after step 3, no periodic checkpoint; {reps} alternating repetitions, medians")
    common.write_results(args.out, "sigterm_exit", args.quick, setup, figures, checks, notes, noise)


if __name__ == "__main__":
    main()
