"""Is the data pipeline ever the bottleneck? Ratios measured side by side in one script.

1. The loader alone (samples/s one rank's TrainStream hands out) against what the training loop
   consumes (samples/s of forward/backward/step on batches already in memory), for configs/demo.yaml.
2. `data_wait` (time the real loop waits on the loader) as a share of step time, read from the
   metrics of a real 2-rank torchrun of configs/demo.yaml.
3. `prefix data prepare`: tokens/s with 1 and 2 worker processes, byte-level and with a trained BPE.

Run: `make bench` (or `.venv/bin/python bench/data_throughput.py [--quick]`); figures in bench/results/data_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Nothing heavy at the top: prepare's worker processes are spawned and import this script again.
REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"


def loader_vs_loop(micro_batches: int, steps: int) -> tuple[float, float]:
    """(loader samples/s, loop samples/s) for one rank of the demo config on this machine."""
    from prefix import config, distributed
    from prefix.data import streams
    from prefix.data.loader import TrainStream
    from prefix.model import GPT
    from prefix.optim import build_optimizer
    from prefix.telemetry import setup_logging

    cfg = config.load(DEMO, ["trainer.device=cpu"])
    world = distributed.init("cpu")
    sources = streams.resolve(cfg, world, setup_logging(0))
    micro = cfg.trainer.micro_batch_size
    train = TrainStream(cfg, sources, accum=cfg.trainer.global_batch_size // micro)
    try:
        train.next()  # workers started, first shard open: the steady state is what counts
        start = time.perf_counter()
        batches = [train.next() for _ in range(micro_batches)]
        loader_rate = micro_batches * micro / (time.perf_counter() - start)
    finally:
        train.close()

    import torch

    torch.manual_seed(0)
    model = GPT(cfg.model)
    optimizer = build_optimizer(model, cfg.trainer)

    def step(batch) -> None:
        _, loss = model(batch.inputs, batch.targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(batches[0])  # warm-up
    start = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    loop_rate = steps * micro / (time.perf_counter() - start)
    return loader_rate, loop_rate


def data_wait_share(steps: int) -> tuple[float, float]:
    """(mean data_wait, mean step_time) in seconds over a real 2-rank run, first interval excluded."""
    with tempfile.TemporaryDirectory() as runs:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "prefix.train", "--config", str(DEMO), "--run-name", "bench", "--runs-root", runs,
               f"trainer.max_steps={steps}", "trainer.log_every=10", "trainer.eval_every=0",
               "trainer.sample_tokens=0", "checkpoint.every_steps=0", "checkpoint.every_seconds=0",
               "trainer.device=cpu"]
        subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)
        lines = (Path(runs) / "bench" / "metrics" / "train.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines][1:]  # the first interval includes start-up
    return (sum(r["data_wait"] for r in records) / len(records),
            sum(r["step_time"] for r in records) / len(records))


def prepare_rates(megabytes: float) -> dict[str, dict[int, float]]:
    """tokens/s of prepare for {tokenizer: {workers: rate}} on Python sources as JSON lines."""
    from prefix.data.corpus import stdlib_documents
    from prefix.data.prepare import prepare
    from prefix.data.tokenizers import train_bpe

    rates: dict[str, dict[int, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        corpus, size = Path(tmp) / "corpus.jsonl", 0
        with open(corpus, "w") as out:
            for name, text in stdlib_documents():
                record = json.dumps({"text": text.decode("utf-8", "replace"), "name": name})
                out.write(record + "\n")
                size += len(record)
                if size > megabytes * 1e6:
                    break
        texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()[:200]]
        bpe = train_bpe(texts, 4096)
        bpe.save(Path(tmp) / "bpe")
        for name, spec in (("bytes", "bytes"), ("bpe-4096", str(Path(tmp) / "bpe" / "tokenizer.json"))):
            for workers in (1, 2):
                out = Path(tmp) / f"{name}-{workers}"
                start = time.perf_counter()
                manifest = prepare([corpus], out, tokenizer=spec, workers=workers, seq_len=512, progress=False)
                tokens = sum(manifest["tokens"].values())
                rates.setdefault(name, {})[workers] = tokens / (time.perf_counter() - start)
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller measurements (about a minute)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="folder for data_throughput.json")
    args = p.parse_args()
    n = 1 if args.quick else 3

    loader, loop = loader_vs_loop(micro_batches=200 * n, steps=20 * n)
    print(f"demo.yaml, one rank on CPU: loader {loader:,.0f} samples/s, training loop consumes "
          f"{loop:,.0f} samples/s: loader / loop = {loader / loop:.1f}x")
    wait, step = data_wait_share(steps=40 * n)
    print(f"demo.yaml, 2 ranks: data_wait {1000 * wait:.2f} ms of {1000 * step:.1f} ms per step "
          f"= {100 * wait / step:.2f} % of step time (target < 1 %)")
    figures = {"loader_samples_per_s": loader, "loop_samples_per_s": loop, "data_wait_s": wait, "step_time_s": step}
    prepare_ratios = []
    for name, by_workers in prepare_rates(megabytes=10 * n).items():
        print(f"prepare ({name}): 1 worker {by_workers[1]:,.0f} tokens/s, 2 workers {by_workers[2]:,.0f} "
              f"tokens/s: 2 / 1 = {by_workers[2] / by_workers[1]:.2f}x")
        figures.update({f"prepare_{name}_{w}_workers_tokens_per_s": rate for w, rate in by_workers.items()})
        prepare_ratios.append((f"prepare ({name}): 2 workers ÷ 1 worker tokens/s", by_workers[2] / by_workers[1]))

    import common  # bench/common.py: here, not at the top (prepare's workers import this script again)

    checks = [common.check("loader ÷ training loop samples/s", loader / loop),
              common.check("data_wait share of step time, 2 ranks", 100 * wait / step, unit="%", at_most=1),
              *(common.check(what, ratio) for what, ratio in prepare_ratios)]
    setup = (f"configs/demo.yaml on the CPU: loader alone vs. one rank's loop on batches in memory; data_wait of a "
             f"{40 * n}-step 2-rank torchrun; prepare of {10 * n} MB of Python sources as JSON lines")
    common.write_results(args.out, "data_throughput", args.quick, setup, figures, checks)


if __name__ == "__main__":
    main()
