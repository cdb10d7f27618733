"""Does prefix's model waste a step? Its training step against a GPT-2-style model of the same size.

- prefix: `prefix.model.GPT` (RMSNorm, rotary positions, SwiGLU, SDPA attention), as the trainer builds it.
- baseline: the GPT-2 design (nanoGPT): learned positions, LayerNorm, a GELU MLP whose width is chosen so
  both models have the same parameter count (±1 %), the same SDPA attention and tied embeddings.
Both train in this process on the same random batches: forward, backward, AdamW step, in float32 on the
CPU (what the tests' machine has), one thread (as each rank of a torchrun launch). Each repetition times `steps` steps of one model then the other (the
order alternating), after warm-up; medians. Goal: prefix's time per token ≤ the baseline's (≤ 1.0×,
within the noise of this machine), at configs/demo.yaml's size and at a wider one.

Run: `make bench`, or `.venv/bin/python bench/model_step.py [--quick]`.
"""

from __future__ import annotations

import math
import statistics
import time

import common
import torch
import torch.nn.functional as F
from torch import nn

from prefix.config import ModelConfig
from prefix.model import GPT


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.fc, self.out = nn.Linear(d, hidden, bias=False), nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2) for t in self.qkv(self.ln1(x)).split(d, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class Gpt2(nn.Module):
    """nanoGPT's model, bias-free linears, tied embeddings."""

    def __init__(self, cfg: ModelConfig, hidden: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(_Block(cfg.d_model, cfg.n_head, hidden) for _ in range(cfg.n_layer))
        self.ln = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.tok.weight
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln(x)).float()
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def matched_hidden(cfg: ModelConfig, target: int) -> int:
    """The GELU width that gives the baseline `target` parameters (to the nearest 8)."""
    per_unit = 2 * cfg.d_model * cfg.n_layer  # each unit of MLP width: one column of fc, one row of out, per layer
    fixed = params(Gpt2(cfg, 8)) - 8 * per_unit
    return max(8, 8 * round((target - fixed) / per_unit / 8))


def time_steps(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Seconds per step (forward, backward, AdamW) over `batches`, after two warm-up steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for x, y in batches[:2]:
        step(x, y)
    begin = time.perf_counter()
    for x, y in batches[2:]:
        step(x, y)
    return (time.perf_counter() - begin) / (len(batches) - 2)


def compare(cfg: ModelConfig, batch: int, steps: int, reps: int) -> dict[str, object]:
    torch.manual_seed(0)
    ours = GPT(cfg)
    hidden = matched_hidden(cfg, params(ours))
    theirs = Gpt2(cfg, hidden)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(cfg.vocab_size, (batch, cfg.seq_len), generator=g),
                torch.randint(cfg.vocab_size, (batch, cfg.seq_len), generator=g)) for _ in range(steps + 2)]
    times: dict[str, list[float]] = {"prefix": [], "gpt2": []}
    for rep in range(reps):
        for name in (("prefix", "gpt2") if rep % 2 == 0 else ("gpt2", "prefix")):
            times[name].append(time_steps(ours if name == "prefix" else theirs, batches))
    ratios = [a / b for a, b in zip(times["prefix"], times["gpt2"], strict=True)]
    tokens = batch * cfg.seq_len
    return {"params_prefix": params(ours), "params_gpt2": params(theirs), "gpt2_mlp_hidden": hidden,
            "tokens_per_step": tokens, "prefix_ms_per_step": 1e3 * statistics.median(times["prefix"]),
            "gpt2_ms_per_step": 1e3 * statistics.median(times["gpt2"]), "ratio": statistics.median(ratios),
            "ratios": [round(r, 3) for r in ratios]}


def main() -> None:
    args = common.parser(__doc__).parse_args()
    from prefix import config

    demo = config.load(common.DEMO, []).model
    wide = config.load(common.DEMO, [o for o in common.MEDIUM if o.startswith("model.")]).model
    sizes = [("demo", demo, 8)] if args.quick else [("demo", demo, 8), ("wide", wide, 2)]
    steps, reps = (4, 2) if args.quick else (12, 7)
    torch.set_num_threads(1)  # as each rank of a torchrun launch runs (it sets OMP_NUM_THREADS=1)
    noise = common.Noise(wait=not args.quick)
    figures: dict[str, object] = {"threads": torch.get_num_threads()}
    checks = []
    for label, cfg, batch in sizes:
        noise.settle()
        result = compare(cfg, batch, steps, reps)
        for key, value in result.items():
            figures[f"{label}_{key}"] = value
        assert math.isclose(result["params_prefix"], result["params_gpt2"], rel_tol=0.01), result
        checks.append({"what": f"{label} ({result['params_prefix'] / 1e6:.2f}M parameters): prefix ÷ GPT-2-style "
                       "model of the same size, time per token of a training step", "value": result["ratio"],
                       "unit": "×", "goal": "≤ 1.0×", "passed": result["ratio"] <= 1.0})
    setup = (f"configs/demo.yaml's model{' and its widening to 6 layers × 512' if not args.quick else ''}, float32 "
             f"on the CPU, {torch.get_num_threads()} threads, {steps} timed steps × {reps} alternating repetitions; "
             "medians of the per-repetition ratios")
    common.write_results(args.out, "model_step", args.quick, setup, figures, checks, noise=noise)


if __name__ == "__main__":
    main()
