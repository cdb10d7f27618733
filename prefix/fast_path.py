"""The GPU fast path: bf16 autocast, torch.compile and the DDP wrapper (docs/performance.md).

None of it changes what a checkpoint holds: the trainer saves the raw module's state.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from prefix.distributed import World
from prefix.model import GPT


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """trainer.precision for this device: bfloat16 autocast, or None for plain float32.

    auto is bf16 on CUDA GPUs with bf16 tensor cores (Ampere and later) and fp32 elsewhere; bf16
    asked for by name runs anywhere autocast supports it (the CPU included, which the tests use).
    bf16 keeps float32's exponent range, so unlike fp16 it needs no loss scaling (no GradScaler).
    """
    if precision == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    else:
        bf16 = precision == "bf16"
    return torch.bfloat16 if bf16 else None


def wants_compile(setting: bool | str, device: torch.device) -> bool:
    """trainer.compile for this device: auto compiles on CUDA only (on a CPU the compile costs more than it saves)."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def wrap(model: GPT, world: World, compiled: bool) -> nn.Module:
    """The module the training step calls: `model` torch.compile'd (if asked), then DDP-wrapped (several ranks).

    Compile first, DDP outside, as nanoGPT does (`torch.compile(model)` then `DDP(model)`; torchtitan
    likewise compiles the blocks before applying data parallelism): DDP stays the outermost module, so
    `no_sync()` during gradient accumulation and its gradient hooks work exactly as in eager mode, on
    the raw model's own parameters. The price: the compiled backward is one graph, so the all-reduce
    overlaps it less than dynamo's DDPOptimizer would with `torch.compile(DDP(model))`; one GPU does
    not care. The compiled wrapper shares the raw module's parameters but prefixes its state_dict
    keys with `_orig_mod.`, so checkpoints hold `Trainer.raw.state_dict()`: compiled and eager runs
    write the same checkpoint and resume each other. Evaluation and sampling call the raw module
    eagerly (no graphs to compile for eval mode or for every prompt length).
    """
    module: nn.Module = torch.compile(model) if compiled else model
    if world.distributed:
        # broadcast_buffers off: the only buffers are the RoPE tables, computed alike on every rank; on,
        # DDP would broadcast them from rank 0 before every forward (a collective per micro-batch).
        module = DDP(module, device_ids=[world.local_rank] if world.device.type == "cuda" else None,
                     broadcast_buffers=False)
    return module


def autocast(dtype: torch.dtype | None, device: torch.device) -> AbstractContextManager:
    """Around forward and loss only; backward runs outside it, as torch advises. Weights, gradients
    and optimizer state stay float32."""
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
