"""A small GPT in plain PyTorch: pre-norm blocks of RMSNorm, rotary causal attention and SwiGLU.

Written to be read top to bottom (in the spirit of nanoGPT). Parameter names are part of the
checkpoint format, so keep them stable: `tok_emb.weight`, `blocks.{i}.attn.qkv.weight`,
`blocks.{i}.attn.proj.weight`, `blocks.{i}.mlp.{gate,up,down}.weight`, `blocks.{i}.{attn,mlp}_norm.weight`,
`norm.weight` and `head.weight` (the same tensor as `tok_emb.weight` unless `model.tie_embeddings` is
false), plus `blocks.{i}.attn.qkv.bias` with `model.qkv_bias`. The options that cover the open families
(grouped-query attention, a free head_dim, Llama 3.1's rope scaling, Qwen2's q/k/v biases) change nothing
when unset, so older checkpoints load as they are. prefix.hf converts it to and from Hugging Face's
`LlamaForCausalLM`, `MistralForCausalLM` and `Qwen2ForCausalLM` (docs/interop.md).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from prefix.config import ModelConfig, RopeScaling


def mlp_width(cfg: ModelConfig) -> int:
    """SwiGLU hidden width: 8/3·d_model rounded up to a multiple of 64 keeps MLP FLOPs ≈ a 4× GELU MLP."""
    if cfg.mlp_hidden is not None:
        return cfg.mlp_hidden
    return 64 * -(-8 * cfg.d_model // 192)  # exact integer ceil(8·d/3 / 64) · 64


def head_dim(cfg: ModelConfig) -> int:
    return cfg.head_dim or cfg.d_model // cfg.n_head


def kv_heads(cfg: ModelConfig) -> int:
    return cfg.n_kv_head or cfg.n_head


def llama3_scaled(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1's rope scaling (transformers' rope_type "llama3"), which stretches the context the model
    was trained with: a frequency whose wavelength is longer than original_max / low_freq_factor turns
    `factor` times slower, one shorter than original_max / high_freq_factor stays, and those between
    blend the two linearly in original_max / wavelength, so the table has no jump."""
    wavelen = 2 * math.pi / inv_freq
    ctx = s.original_max_position_embeddings
    blend = (ctx / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    between = (1 - blend) * inv_freq / s.factor + blend * inv_freq
    slowed = torch.where(wavelen > ctx / s.low_freq_factor, inv_freq / s.factor, between)
    return torch.where(wavelen < ctx / s.high_freq_factor, inv_freq, slowed)


def rope_cache(head_dim: int, seq_len: int, theta: float,
               scaling: RopeScaling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [seq_len, head_dim] in float32, halves duplicated (the "rotate half" layout); the
    first half of sin is negated: rotate-half's sign, folded into the table once instead of every step."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling is not None:
        inv_freq = llama3_scaled(inv_freq, scaling)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return torch.cat((angles, angles), dim=-1).cos().float(), torch.cat((-angles, angles), dim=-1).sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, hd] by position: pairs are (i, i + hd/2), as in Llama / Hugging Face.

    Rotate-half is x·cos + [-x2, x1]·sin; with the sign in the table it is one roll and two multiplies
    (no chunk, neg, cat), bitwise the same result, as -a·b and a·(-b) round alike."""
    return (x * cos + x.roll(x.size(-1) // 2, dims=-1) * sin).to(x.dtype)


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm with its backward written out: on the CPU torch has no fused kernel for it (F.rms_norm is
    composite there: its autograd graph keeps and replays every small op), and this takes ~30 % less time.
    The forward is F.rms_norm's arithmetic, bitwise; the backward rounds in its own order."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))
        normed = x * rstd
        ctx.save_for_backward(normed, rstd, weight)
        return normed * weight

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        normed, rstd, weight = ctx.saved_tensors
        g = grad * weight
        grad_x = (g - normed * (g * normed).mean(-1, keepdim=True)) * rstd
        return grad_x, (grad * normed).flatten(0, -2).sum(0), None


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same parameter, same checkpoints); on the CPU in float32 through `_RMSNormFunction`.
    Elsewhere F.rms_norm, which CUDA runs as one fused kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cpu and x.dtype == torch.float32 and self.weight is not None and self.eps is not None:
            return _RMSNormFunction.apply(x, self.weight, self.eps)
        return super().forward(x)


class CausalSelfAttention(nn.Module):
    """Causal attention with grouped-query heads: n_head query heads share n_kv_head key/value heads
    (equal counts: plain multi-head). RoPE on q and k, the fused SDPA kernel for the rest. One Linear
    computes q, k and v: its output rows are [q; k; v], each head-major."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, kv_heads(cfg), head_dim(cfg)
        self.widths = (self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim)
        self.qkv = nn.Linear(cfg.d_model, sum(self.widths), bias=cfg.qkv_bias)
        self.proj = nn.Linear(self.widths[0], cfg.d_model, bias=False)
        self.proj.residual_out = True  # scaled init: see GPT._init_weights

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        qk, v = self.qkv(x).split((self.widths[0] + self.widths[1], self.widths[2]), dim=-1)
        # q and k rotated together, in [B, T, heads, hd] as the projection left them: one op, not two
        qk = apply_rotary(qk.view(B, T, -1, self.head_dim), cos[:, None], sin[:, None])
        q, k = (t.transpose(1, 2) for t in qk.split((self.n_head, self.n_kv_head), dim=2))
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)
        if k.size(1) != q.size(1) and q.is_cuda and q.dtype == torch.float32:
            # Only flash attention takes grouped k/v as they are, and only in half precision; in float32
            # SDPA would fall back to its slow math kernel, so give it full-size k/v instead.
            k, v = (t.repeat_interleave(q.size(1) // k.size(1), dim=1) for t in (k, v))
        grouped = {"enable_gqa": True} if k.size(1) != q.size(1) else {}  # plain heads: the call as it always was
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, **grouped)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.widths[0]))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the gated MLP of PaLM / Llama."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hidden = mlp_width(cfg)
        self.gate = nn.Linear(cfg.d_model, hidden, bias=False)
        self.up = nn.Linear(cfg.d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, cfg.d_model, bias=False)
        self.down.residual_out = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # gate and up as one matmul (bitwise the two): fewer, larger matmuls, the parameters as they were
        gate, up = F.linear(x, torch.cat((self.gate.weight, self.up.weight))).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


def _fill(param: torch.Tensor, make) -> None:
    """Give `param` the values of `make(full shape)`: all of them, or this rank's slice of a sharded one."""
    if param.is_meta:
        return
    from prefix.distributed import dtensor_type

    full = make(param.shape)
    if isinstance(param, dtensor_type() or ()):  # slice locally (src_data_rank=None: no communication)
        from torch.distributed.tensor import distribute_tensor

        full = distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(full.to_local())
    else:
        param.copy_(full)


class GPT(nn.Module):
    """Decoder-only language model. Seed torch before constructing it: the initial weights follow
    `torch.initial_seed()` (see `init_weights`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight  # tied: one Parameter, saved under both names
        # trainer.activation_checkpointing: recompute each block in backward. A plain attribute, not
        # state, so the state_dict (the checkpoint format) is the same with it on or off.
        self.activation_checkpointing = False
        # Derived from the config, so recomputed rather than stored in checkpoints.
        cos, sin = rope_cache(head_dim(cfg), cfg.seq_len, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights(torch.initial_seed())

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """N(0, init_std) from a generator of its own, drawn on the CPU one full tensor at a time in a fixed
        order, so a model on any device, whole or sharded over ranks (FSDP: each rank keeps its slice of
        each drawn tensor), starts from the same weights. Residual output projections are shrunk by
        1/sqrt(2·n_layer) (GPT-2) so the residual stream's variance does not grow with depth; RMSNorm
        gains start at 1, biases at 0. Weights on the meta device are left for `to_empty` + a second call."""
        g = torch.Generator().manual_seed(seed)
        for module in self.modules():
            if module is self.head and self.cfg.tie_embeddings:
                continue  # its weight is the embedding, initialised once there
            std = self.cfg.init_std / (math.sqrt(2 * self.cfg.n_layer) if getattr(module, "residual_out", False) else 1)
            if isinstance(module, (nn.Linear, nn.Embedding)):
                _fill(module.weight, lambda shape, std=std: torch.empty(shape).normal_(0.0, std, generator=g))
                if getattr(module, "bias", None) is not None:
                    _fill(module.bias, torch.zeros)
            elif isinstance(module, nn.RMSNorm):
                _fill(module.weight, torch.ones)

    def init_buffers(self) -> None:
        """The RoPE tables, derived from the config (recomputed after `to_empty` on a model built on meta)."""
        cos, sin = rope_cache(head_dim(self.cfg), self.cfg.seq_len, self.cfg.rope_theta, self.cfg.rope_scaling)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx, targets: [B, T] token ids with T ≤ seq_len. Returns float32 logits [B, T, V] and the
        mean cross-entropy over all positions (None without targets)."""
        T = idx.shape[1]
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence length {T} exceeds model.seq_len={self.cfg.seq_len}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.tok_emb(idx)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            # Non-reentrant checkpointing: keeps only each block's input, reruns the block in backward.
            x = checkpoint(block, x, cos, sin, use_reentrant=False) if recompute else block(x, cos, sin)
        logits = self.head(self.norm(x)).float()
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Append max_new_tokens sampled tokens to idx [B, T]; temperature 0 is greedy. Each step
        reruns the last seq_len tokens (no KV cache: simple, and fast enough for samples in logs)."""
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                logits, _ = self(idx[:, -self.cfg.seq_len:])
                logits = logits[:, -1, :]
                if temperature == 0:
                    next_id = logits.argmax(dim=-1, keepdim=True)
                else:
                    logits = logits / temperature
                    if top_k is not None:
                        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    probs = F.softmax(logits, dim=-1)
                    next_id = torch.multinomial(probs, num_samples=1, generator=generator)
                idx = torch.cat((idx, next_id), dim=1)
        finally:
            self.train(was_training)
        return idx

    def num_params(self) -> int:
        """Unique parameters (the tied embedding/head counted once)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> int:
        """Training FLOPs per token, PaLM appendix B (as nanoGPT): 6·N + 12·L·H·Q·T, where 6·N covers the
        weight matmuls forward and backward and 12·L·H·Q·T the attention scores and values (H query heads
        of width Q, d_model by default; grouped k/v change N, not this term; T = seq_len). Recomputation
        by activation checkpointing is not counted: MFU, not HFU."""
        c = self.cfg
        return 6 * self.num_params() + 12 * c.n_layer * c.n_head * head_dim(c) * c.seq_len


def complete(model: GPT, tokenizer, prompt: str, tokens: int, seed: int, device: torch.device,
             temperature: float = 0.8, top_k: int | None = 40) -> str:
    """The prompt and `tokens` sampled continuations, decoded (deterministic for a seed).

    An empty prompt starts from the end-of-document token, as a new document would (GPT-2's way);
    that token is not part of the text returned.
    """
    ids = [int(i) for i in tokenizer.encode(prompt)]
    idx = torch.tensor(ids or [tokenizer.eod_id], dtype=torch.long, device=device)[None]
    gen = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(idx, tokens, temperature=temperature, top_k=top_k, generator=gen)[0].tolist()
    return tokenizer.decode(out if ids else out[1:])


PEAK_BF16_FLOPS = {"H200": 989e12, "H100 SXM": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12,
                   "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12, "V100": 125e12}
"""Dense bf16 (fp16 for V100) tensor-core peaks without sparsity, by a substring of the device name."""


def peak_flops(device: torch.device) -> float | None:
    """The device's peak FLOP/s for MFU, or None where it is not known (CPUs, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices and embeddings (dim ≥ 2), not norm gains (dim < 2).
    parameters() deduplicates, so the tied weight appears once."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
