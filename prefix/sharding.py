"""FSDP2 (`trainer.parallelism: fsdp`): the model's weights, gradients and optimizer state sharded over the ranks.

Each block is its own FSDP unit, then the root (embedding, final norm, head): a block's weights are
all-gathered just before its forward and backward and freed after, so a rank holds 1/N of the model
plus about two blocks at a time. The model is built on the meta device (no memory), sharded, then
materialised: `to_empty` gives each rank storage for its shards only, `init_weights` draws every
tensor whole on the CPU, one at a time, and keeps this rank's slice (the same weights DDP starts
from), and `init_buffers` recomputes the RoPE tables `to_empty` left uninitialised.

On a GPU with bf16, `MixedPrecisionPolicy` gathers bf16 weights and reduces gradients in float32;
the sharded master weights and the optimizer stay float32. docs/scale.md says what this costs and
what is bitwise.
"""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from prefix.config import Config
from prefix.distributed import World, dtensor_type
from prefix.fast_path import autocast_dtype, wants_compile
from prefix.model import GPT

# torch.distributed's fsdp, tensor and checkpoint modules are imported where used: together they cost
# a DDP start (which never needs them) a second or two.


def build(cfg: Config, world: World) -> GPT:
    """A GPT sharded over every rank, initialised as `GPT(cfg.model)` after `torch.manual_seed(cfg.run.seed)`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    amp_dtype = autocast_dtype(cfg.trainer.precision, world.device)
    compiled = wants_compile(cfg.trainer.compile, world.device)
    with torch.device("meta"):
        model = GPT(cfg.model)
    mesh = init_device_mesh(world.device.type, (world.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32) if amp_dtype \
        else MixedPrecisionPolicy()
    for block in model.blocks:
        if compiled:
            block.compile()  # in place: the state_dict keys stay those of the plain model
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    model.to_empty(device=world.device)
    model.init_buffers()
    model.init_weights(cfg.run.seed)
    return model


def is_sharded(model: nn.Module) -> bool:
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing can be sharded
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def gradient_sync(module: nn.Module, sync: bool) -> AbstractContextManager:
    """Around one micro-batch's backward: reduce the gradients only on the last one (DDP and FSDP alike)."""
    if is_sharded(module):
        module.set_requires_gradient_sync(sync)
        return nullcontext()
    no_sync = getattr(module, "no_sync", None)
    return nullcontext() if sync or no_sync is None else no_sync()


def clip_gradients(model: nn.Module, max_norm: float) -> torch.Tensor:
    """The global gradient norm (clipped to max_norm), a plain tensor whether or not the gradients are sharded."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if isinstance(norm, dtensor_type() or ()) else norm


def state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The sharded model and optimizer state, keyed by parameter name: what DCP writes and reads."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}


def load(model: nn.Module, optimizer: torch.optim.Optimizer, loaded: dict[str, Any]) -> None:
    """Put what DCP read into `state(model, optimizer)`'s tensors back into the model and optimizer."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, loaded["model"])
    set_optimizer_state_dict(model, optimizer, loaded["optimizer"])
