"""The optimizer and its schedule: AdamW (or Nesterov SGD) over decay / no-decay groups, warm-up then cosine."""

from __future__ import annotations

import math

import torch

from prefix.config import TrainerConfig
from prefix.model import GPT, param_groups


def lr_factor(step: int, t: TrainerConfig) -> float:
    """Linear warm-up to 1, then cosine decay to min_lr / lr at max_steps."""
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    floor = t.min_lr / t.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: GPT, t: TrainerConfig) -> torch.optim.Optimizer:
    """AdamW is fused (one CUDA kernel for the whole update, not several per tensor) when the weights
    are on a GPU; its state_dict has the same keys either way."""
    groups = param_groups(model, t.weight_decay)
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.beta1, nesterov=True)
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=True if fused else None)
