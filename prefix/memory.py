"""Per-rank GPU memory of a training run, from its config alone: does it fit, and if not, what to change.

`prefix plan` prints it before anyone spends GPU hours; training runs `check_fits` at start, so a run that
cannot fit exits 2 with one line instead of an out-of-memory crash minutes in. Figures are for the
memory peak at the start of backward, in eager mode (torch.compile saves less), and aim at ±30%.

Weights, gradients and AdamW moments are fp32 (4 + 4 + 8 bytes per parameter; SGD momentum 4): whole on
every rank under ddp, split evenly over the ranks under fsdp (FSDP2 shards every tensor on dim 0).

Activations, per sequence of T tokens (bytes; d = d_model, kv = n_kv_head·head_dim, h = mlp width,
c = compute-dtype bytes: 2 under bf16 autocast, 4 in fp32), with flash/SDPA attention, so no T² term:
  a block, without recomputation: T·(20·d + (4·d + 3·kv + 4·h)·c): the fp32 residual stream and norm
    tensors (5 of width d) plus the compute-dtype q/k/v, rotary, attention output and SwiGLU's gate, up,
    silu and product. This is Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
    Transformer Models", 34·s·b·h for GPT) redone for this model and calibrated by counting the tensors
    autograd saves (saved_tensors_hooks) in bf16 and fp32.
  a block, with activation checkpointing: its fp32 input, T·d·4, plus one block's full activations
    while that block is recomputed.
  the loss: four fp32 [T, V] tensors at the start of backward: the logits (the trainer holds them), the
    log-softmax cross-entropy saves, and the gradient going in and coming out of it.

Buffers: a constant for the CUDA context, NCCL and allocator slack; ddp adds its gradient buckets (a second
fp32 copy of the gradients) and autocast's cached bf16 copy of every weight; fsdp adds the unsharded
compute-dtype weights of the root group (embeddings, norm, head) and their gradients, and of two blocks
(the current and the prefetched one) plus one block's gradient (assumes a bf16 MixedPrecisionPolicy).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from prefix.config import Config, ModelConfig
from prefix.errors import UserError

GiB = 2**30
OVERHEAD = 2 * GiB
"""CUDA context (~0.5-1 GiB outside torch's allocator), NCCL's buffers and the caching allocator's slack."""
LOGIT_COPIES = 4
"""fp32 [B, T, V] tensors alive at the start of backward: logits, log-softmax, its gradient in and out."""

_counts: dict[str, tuple[int, int, int]] = {}


def param_counts(m: ModelConfig) -> tuple[int, int, int]:
    """(all parameters, one block's, the rest's: embeddings, final norm, head), from the real module built on
    the meta device: exact for every option (tied head, q/k/v biases, grouped heads), instant, no memory."""
    key = repr(m)
    if key not in _counts:
        import torch

        from prefix.model import GPT

        with torch.device("meta"):
            model = GPT(m)
        block = sum(p.numel() for p in model.blocks[0].parameters())
        total = model.num_params()
        _counts[key] = (total, block, total - m.n_layer * block)
    return _counts[key]


@dataclass(frozen=True)
class Estimate:
    """Bytes per rank at the memory peak; `activations` is for the config's activation_checkpointing."""

    params: int
    grads: int
    optimizer: int
    activations: int
    activations_without_ac: int
    activations_with_ac: int
    buffers: int
    total: int
    n_params: int
    world_size: int
    parallelism: str
    activation_checkpointing: bool
    micro_batch_size: int
    compute_bytes: int


def compute_bytes(cfg: Config, device: str | None = None) -> int:
    """2 when the run computes in bf16 (precision bf16, or auto on a GPU), else 4. Planning is for GPUs, so
    device auto counts as cuda."""
    device = device or cfg.trainer.device
    precision = cfg.trainer.precision
    return 2 if precision == "bf16" or (precision == "auto" and device in ("auto", "cuda")) else 4


def estimate(cfg: Config, world_size: int, device: str | None = None) -> Estimate:
    """Per-rank memory of `cfg` trained on `world_size` ranks (`device`: the run's device type, for
    precision auto; default trainer.device)."""
    from prefix.model import head_dim, kv_heads, mlp_width

    m, t = cfg.model, cfg.trainer
    n, block, rest = param_counts(m)
    c = compute_bytes(cfg, device)
    shards = world_size if t.parallelism == "fsdp" else 1
    params, grads = 4 * n // shards, 4 * n // shards
    optimizer = (8 if t.optimizer == "adamw" else 4) * n // shards
    tokens = t.micro_batch_size * m.seq_len
    layer = tokens * (20 * m.d_model + (4 * m.d_model + 3 * kv_heads(m) * head_dim(m) + 4 * mlp_width(m)) * c)
    loss = tokens * m.vocab_size * 4 * LOGIT_COPIES
    without_ac = m.n_layer * layer + loss
    with_ac = m.n_layer * tokens * m.d_model * 4 + layer + loss
    activations = with_ac if t.activation_checkpointing else without_ac
    if t.parallelism == "fsdp":
        buffers = OVERHEAD + (2 * rest + 3 * block) * c
    else:
        buffers = OVERHEAD + (4 * n if world_size > 1 else 0) + (c * n if c < 4 else 0)
    total = params + grads + optimizer + activations + buffers
    return Estimate(params, grads, optimizer, activations, without_ac, with_ac, buffers, total, n, world_size,
                    t.parallelism, t.activation_checkpointing, t.micro_batch_size, c)


def fits(est: Estimate, memory_bytes: int) -> bool:
    return est.total <= memory_bytes


def gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def count(n: int) -> str:
    """8.03B, 494M: parameter counts as people say them."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n:,}"


def ranks(n: int) -> str:
    return f"{n} rank" if n == 1 else f"{n} ranks"


def _with(cfg: Config, **trainer: object) -> Config:
    return dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, **trainer))


def min_gpus(cfg: Config, memory_bytes: int, device: str | None = None, limit: int = 65536) -> int | None:
    """The fewest ranks on which `cfg` under fsdp fits (None: not even `limit`: activations alone are too big)."""
    cfg = _with(cfg, parallelism="fsdp")
    if not fits(estimate(cfg, limit, device), memory_bytes):
        return None
    lo, hi = 1, limit  # per-rank memory falls as ranks are added: bisect
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(estimate(cfg, mid, device), memory_bytes) else (mid + 1, hi)
    return lo


def advice(cfg: Config, world_size: int, memory_bytes: int, device: str | None = None) -> list[str]:
    """What to change, cheapest first, each step on top of the ones before and re-estimated, until it fits:
    activation checkpointing (a third more compute), fsdp (communication), a smaller micro-batch (more
    accumulation steps), and last more GPUs. Empty when the config fits as it is."""
    if fits(estimate(cfg, world_size, device), memory_bytes):
        return []
    tips = []

    def step(change: dict, text: str) -> bool:
        nonlocal cfg
        cfg = _with(cfg, **change)
        est = estimate(cfg, world_size, device)
        tips.append(f"{text}: ~{gib(est.total)} per rank" + (", fits" if fits(est, memory_bytes) else ""))
        return fits(est, memory_bytes)

    if not cfg.trainer.activation_checkpointing and step(
            {"activation_checkpointing": True}, "set trainer.activation_checkpointing=true"):
        return tips
    if cfg.trainer.parallelism == "ddp" and world_size > 1 and step(
            {"parallelism": "fsdp"}, "set trainer.parallelism=fsdp"):
        return tips
    t = cfg.trainer
    for mb in range(t.micro_batch_size - 1, 0, -1):
        if t.global_batch_size % (mb * world_size) == 0 and fits(estimate(_with(cfg, micro_batch_size=mb),
                                                                          world_size, device), memory_bytes):
            accum = t.global_batch_size // (mb * world_size)
            step({"micro_batch_size": mb}, f"set trainer.micro_batch_size={mb} ({accum} accumulation steps "
                 f"keep global_batch_size={t.global_batch_size})")
            return tips
    need = min_gpus(_with(cfg, micro_batch_size=1), memory_bytes, device)
    if need is None:
        tips.append(f"one sequence of model.seq_len={cfg.model.seq_len} does not fit in {gib(memory_bytes)} on "
                    "any number of GPUs; lower model.seq_len or use GPUs with more memory")
    else:
        tips.append(f"fsdp needs at least {need} GPUs of {gib(memory_bytes)} (with trainer.micro_batch_size=1; "
                    "global_batch_size a multiple of the GPU count)")
    return tips


class DoesNotFit(UserError):
    """The run would run out of GPU memory; the same verdict on every rank."""

    same_on_every_rank = True


def available(world) -> tuple[int, str]:
    """Bytes one rank may use, and how to name them: its GPU's memory, or on a CPU its share of the host's."""
    if world.device.type == "cuda":
        import torch

        gpu = torch.cuda.get_device_properties(world.device)
        return gpu.total_memory, f"{world.device} ({gpu.name})"
    import psutil

    n = world.local_world_size
    return psutil.virtual_memory().total // n, f"each of this host's {n} rank{'s' if n > 1 else ''}"


def check_fits(cfg: Config, world_size: int, memory_bytes: int, where: str,
               device: str | None = None) -> Estimate:
    """The estimate, or DoesNotFit naming the first change that helps: before any data or GPU time is spent."""
    est = estimate(cfg, world_size, device)
    if not fits(est, memory_bytes):
        tips = advice(cfg, world_size, memory_bytes, device)
        first = tips[0] if tips else "use GPUs with more memory"
        more = len(tips) - 1
        first += f", then {more} more change{'s' if more > 1 else ''}" if more > 0 else ""
        raise DoesNotFit(f"plan: the {count(est.n_params)}-parameter {cfg.model.family} model needs "
                         f"~{gib(est.total)} per rank with {est.parallelism} on {ranks(world_size)}, {where} has "
                         f"{gib(memory_bytes)}; {first}; "
                         "`prefix plan` shows the breakdown")
    return est


def describe(est: Estimate, memory_bytes: int) -> str:
    """The table `prefix plan` prints: one row per kind of memory, per rank."""
    shard = f"1/{est.world_size} of " if est.parallelism == "fsdp" and est.world_size > 1 else ""
    used = ("", "  <- counted") if est.activation_checkpointing else ("  <- counted", "")
    rows = [("parameters", est.params, f"{shard}{count(est.n_params)} fp32 weights"),
            ("gradients", est.grads, f"{shard}fp32 gradients"),
            ("optimizer", est.optimizer, f"{shard}fp32 optimizer state"),
            ("activations", est.activations_without_ac,
             f"micro_batch_size {est.micro_batch_size}, no activation checkpointing{used[0]}"),
            ("  with AC", est.activations_with_ac, f"with activation checkpointing{used[1]}"),
            ("buffers", est.buffers, f"{est.parallelism} buffers, CUDA context, allocator"),
            ("total", est.total, f"per rank, {est.parallelism} on {ranks(est.world_size)}"),
            ("available", memory_bytes, "per GPU")]
    lines = [f"{name:<12}{gib(size):>11}  {note}" for name, size, note in rows]
    return "\n".join([*lines, f"{'fits':<12}{'yes' if fits(est, memory_bytes) else 'no':>11}"])
