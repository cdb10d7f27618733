"""`prefix plan --config C [section.key=value ...] --nproc-per-node 8 [--nnodes 1] --gpu-memory 80GiB`:
the per-rank GPU memory a run needs, whether it fits, and what to change if not (prefix/memory.py).

Run it before spending GPU hours: it reads only the config (the model is built on the meta device), so it
answers in a second on a laptop. Exit 0: it fits; exit 2: it does not (the table, the changes that make it
fit, cheapest first, and one `error:` line). Training runs the same check at start (docs/scale.md).
"""

from __future__ import annotations

import argparse

from prefix.errors import UserError


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file, as `prefix train` takes it")
    p.add_argument("--nproc-per-node", type=int, default=1, metavar="N", help="GPUs (ranks) per node (default 1)")
    p.add_argument("--nnodes", type=int, default=1, metavar="N", help="nodes (default 1)")
    p.add_argument("--gpu-memory", metavar="SIZE",
                   help="memory of one GPU, e.g. 80GiB, 80GB, 141GiB (default: the visible CUDA device's)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, as `prefix train` takes them (e.g. trainer.parallelism=fsdp)")


def gpu_memory(text: str | None) -> tuple[int, str]:
    """Bytes of one GPU and how to name it: --gpu-memory, else the visible CUDA device."""
    from prefix.config import parse_size

    if text is not None:
        size = parse_size(text)
        if not size:
            raise UserError(f"--gpu-memory {text!r} is not a size; write it like 80GiB, 80GB or 141GiB")
        return size, "each GPU (--gpu-memory)"
    import torch

    if not torch.cuda.is_available():
        raise UserError("no CUDA device is visible here; pass the memory of one GPU, e.g. --gpu-memory 80GiB")
    props = torch.cuda.get_device_properties(0)
    return props.total_memory, f"each {props.name}"


def run(args: argparse.Namespace) -> int:
    from prefix import config, memory

    if args.nproc_per_node < 1 or args.nnodes < 1:
        raise UserError("--nproc-per-node and --nnodes must be at least 1")
    cfg = config.load(args.config, args.overrides)
    world_size = args.nproc_per_node * args.nnodes
    size, where = gpu_memory(args.gpu_memory)
    est = memory.estimate(cfg, world_size)
    print(memory.describe(est, size))
    tips = memory.advice(cfg, world_size, size)
    if tips:
        print("\nto fit, cheapest first (each on top of the ones before):")
        print("\n".join(f"  {i}. {tip}" for i, tip in enumerate(tips, 1)))
    memory.check_fits(cfg, world_size, size, where)  # does not fit: its one line, exit 2
    return 0
