"""Hugging Face interop: prefix's GPT as a Llama, Mistral or Qwen2 folder (config.json + safetensors), both ways.

The three families are one architecture: pre-norm RMSNorm blocks, rotary attention with grouped-query
heads, a SwiGLU MLP. They differ in options a prefix GPT has too: Llama 3.1's `llama3` rope scaling,
Qwen2's q/k/v biases, Mistral's (and Qwen2's) sliding window, which prefix keeps only when it covers
the whole context. `model.family` says which architecture a run is (`FAMILIES`). The conversion is a
renaming plus one layout change (`mapping`, the only place that knows the names):

- the fused `attn.qkv.weight` [(H + 2·K)·D, C] (H heads, K key/value heads of width D) is the
  row-wise concatenation [q; k; v] of `q_proj`, `k_proj`, `v_proj`, each head-major; `attn.qkv.bias`
  likewise of their biases;
- rotary embeddings: prefix rotates the pairs (i, i + head_dim/2) with cos/sin halves duplicated,
  which is Hugging Face's `rotate_half` convention, so q and k rows are copied as they are (Meta's
  original checkpoints rotate interleaved pairs; their conversion script permutes rows to reach
  this layout, and an HF folder already has it);
- `tie_word_embeddings` is `model.tie_embeddings`: a tied export has no `lm_head.weight`.

`prefix export RUN --out DIR` (prefix/tools/export.py) writes a checkpoint as such a folder; prefix.pretrained
reads one (`model.init_from: DIR`, `prefix sample DIR`). prefix never downloads: folders are local.
See docs/interop.md.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from prefix.config import ModelConfig, RopeScaling
from prefix.errors import UserError

CONFIG, WEIGHTS, INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
"""An export also holds tokenizer/ (data.tokenizers.COPY): prefix's copy of the run's tokenizer, as in meta/."""
IGNORED = ("rotary_emb.inv_freq",)
"""Tensors older Llama saves carry that are derived, not learned: skipped on import."""
FAMILIES = {"llama": ("Llama", "LlamaForCausalLM"), "mistral": ("Mistral", "MistralForCausalLM"),
            "qwen2": ("Qwen2", "Qwen2ForCausalLM")}
"""model.family (= config.json's model_type) → its name and the architecture an export declares."""
_COMMON = {"hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None,
           "tie_word_embeddings": False}
DEFAULTS = {
    "llama": {**_COMMON, "attention_bias": False, "mlp_bias": False, "max_position_embeddings": 2048,
              "num_key_value_heads": None},
    "mistral": {**_COMMON, "max_position_embeddings": 131072, "num_key_value_heads": 8, "sliding_window": 4096},
    "qwen2": {**_COMMON, "max_position_embeddings": 32768, "num_key_value_heads": 32, "use_sliding_window": False,
              "sliding_window": 4096, "max_window_layers": 28},
}
"""transformers' config defaults, per family, for the keys a config.json may leave out."""


class InteropError(UserError):
    """A folder or checkpoint prefix cannot convert; every rank finds the same problem."""

    same_on_every_rank = True


# -- names and layouts -------------------------------------------------------------------------------

def mapping(m: ModelConfig) -> list[tuple[str, tuple[str, ...], tuple[int, ...] | None]]:
    """(prefix name, Hugging Face names, rows) in model order. Several HF names: the prefix tensor is their
    row-wise concatenation (dim 0), in that order, `rows` giving each one's rows (None: one name, the
    same tensor). `head.weight` appears only when untied, `attn.qkv.bias` only with model.qkv_bias."""
    from prefix.model import head_dim, kv_heads

    kv = kv_heads(m) * head_dim(m)
    qkv = (m.n_head * head_dim(m), kv, kv)
    pairs: list[tuple[str, tuple[str, ...], tuple[int, ...] | None]] = [
        ("tok_emb.weight", ("model.embed_tokens.weight",), None)]
    for i in range(m.n_layer):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        pairs += [(b + "attn_norm.weight", (h + "input_layernorm.weight",), None),
                  (b + "attn.qkv.weight", tuple(f"{h}self_attn.{x}_proj.weight" for x in "qkv"), qkv)]
        if m.qkv_bias:
            pairs.append((b + "attn.qkv.bias", tuple(f"{h}self_attn.{x}_proj.bias" for x in "qkv"), qkv))
        pairs += [(b + "attn.proj.weight", (h + "self_attn.o_proj.weight",), None),
                  (b + "mlp_norm.weight", (h + "post_attention_layernorm.weight",), None),
                  (b + "mlp.gate.weight", (h + "mlp.gate_proj.weight",), None),
                  (b + "mlp.up.weight", (h + "mlp.up_proj.weight",), None),
                  (b + "mlp.down.weight", (h + "mlp.down_proj.weight",), None)]
    pairs.append(("norm.weight", ("model.norm.weight",), None))
    if not m.tie_embeddings:
        pairs.append(("head.weight", ("lm_head.weight",), None))
    return pairs


def to_hf(state: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """prefix state dict → HF tensors (separate, contiguous: safetensors refuses shared storage)."""
    out = {}
    for name, hf_names, rows in mapping(m):
        parts = state[name].split(rows, dim=0) if rows else (state[name],)
        for hf_name, part in zip(hf_names, parts, strict=True):
            out[hf_name] = part.detach().to("cpu").clone().contiguous()
    return out


def hf_config(m: ModelConfig, eos_id: int | None) -> dict[str, Any]:
    """config.json for model.family's architecture describing the GPT of `m` (seq_len → max_position_embeddings)."""
    from prefix.model import head_dim, kv_heads, mlp_width

    scaling = None if m.rope_scaling is None else {"rope_type": "llama3", **dataclasses.asdict(m.rope_scaling)}
    cfg = {"architectures": [FAMILIES[m.family][1]], "model_type": m.family, "vocab_size": m.vocab_size,
           "hidden_size": m.d_model, "intermediate_size": mlp_width(m), "num_hidden_layers": m.n_layer,
           "num_attention_heads": m.n_head, "num_key_value_heads": kv_heads(m), "head_dim": head_dim(m),
           "hidden_act": "silu", "max_position_embeddings": m.seq_len, "initializer_range": m.init_std,
           "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta, "rope_scaling": scaling,
           "attention_dropout": 0.0, "tie_word_embeddings": m.tie_embeddings, "bos_token_id": None,
           "eos_token_id": eos_id, "pad_token_id": None, "torch_dtype": "float32", "use_cache": True}
    if m.family == "llama":
        cfg.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif m.family == "mistral":
        cfg.update(sliding_window=m.sliding_window)
    else:  # qwen2: a window, when set, on every layer (it covers the whole context either way)
        cfg.update(use_sliding_window=m.sliding_window is not None, sliding_window=m.sliding_window,
                   max_window_layers=0 if m.sliding_window is not None else m.n_layer)
    return cfg


def model_shape(m: ModelConfig) -> dict[str, Any]:
    """The ModelConfig values `shape_of` reads from a folder, as `m` has them: n_kv_head and head_dim
    None where they are the default (so an unset key and its default value compare equal)."""
    from prefix.model import head_dim, kv_heads, mlp_width

    return {"vocab_size": m.vocab_size, "seq_len": m.seq_len, "n_layer": m.n_layer, "n_head": m.n_head,
            "d_model": m.d_model, "mlp_hidden": mlp_width(m), "rope_theta": m.rope_theta, "norm_eps": m.norm_eps,
            "tie_embeddings": m.tie_embeddings, "family": m.family,
            "n_kv_head": None if kv_heads(m) == m.n_head else kv_heads(m),
            "head_dim": None if m.d_model % m.n_head == 0 and head_dim(m) == m.d_model // m.n_head else head_dim(m),
            "rope_scaling": None if m.rope_scaling is None else dataclasses.asdict(m.rope_scaling),
            "qkv_bias": m.qkv_bias, "sliding_window": m.sliding_window}


def _rope_scaling(rs: Any) -> tuple[dict[str, Any] | None, str | None]:
    """config.json's rope_scaling as model.rope_scaling's values, or why a prefix GPT cannot have it."""
    if rs in (None, {}) or isinstance(rs, dict) and rs.get("rope_type", rs.get("type")) == "default":
        return None, None
    if not isinstance(rs, dict) or rs.get("rope_type", rs.get("type")) != "llama3":
        kind = rs.get("rope_type", rs.get("type")) if isinstance(rs, dict) else rs
        return None, f"rope_scaling type {kind!r} (prefix implements llama3 only)"
    keys = [f.name for f in dataclasses.fields(RopeScaling)]
    if not all(isinstance(rs.get(k), (int, float)) and not isinstance(rs.get(k), bool) for k in keys):
        return None, f"rope_scaling {json.dumps(rs)} (llama3 needs numbers {', '.join(keys)})"
    return {k: int(rs[k]) if k == "original_max_position_embeddings" else float(rs[k]) for k in keys}, None


def _window(family: str, hf: dict[str, Any]) -> Any:
    """The attention window a folder applies (None: full causal attention on every layer)."""
    if family == "mistral":
        return hf["sliding_window"]
    if family == "qwen2" and hf["use_sliding_window"]:  # off (the Qwen2.5 releases): no window anywhere
        layers = hf.get("layer_types") or ["sliding_attention" if i >= hf["max_window_layers"] else "full"
                                           for i in range(hf["num_hidden_layers"])]
        return hf["sliding_window"] if "sliding_attention" in layers else None
    return None


def shape_of(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """The ModelConfig values of a Llama, Mistral or Qwen2 config.json (seq_len from
    max_position_embeddings); refuses what a prefix GPT cannot represent."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        kind = family or ",".join(hf.get("architectures") or []) or "unknown"
        raise InteropError(f"{where}: model_type {kind!r} is not a Llama, Mistral or Qwen2; prefix converts "
                           "LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM folders only "
                           "(model_type llama, mistral, qwen2)")
    hf = {**DEFAULTS[family], **hf}
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if not (isinstance(hf.get(k), int) and hf[k] > 0)]
    if missing:
        raise InteropError(f"{where}: lacks a positive {', '.join(missing)}; write the full config "
                           "(save_pretrained does)")
    heads, width = hf["num_attention_heads"], hf["hidden_size"]
    kv, hd = hf.get("num_key_value_heads") or heads, hf.get("head_dim") or width // heads
    scaling, rope_problem = _rope_scaling(hf["rope_scaling"])
    window = _window(family, hf)
    unsupported = [
        (hf["hidden_act"] != "silu", f"hidden_act {hf['hidden_act']!r} (prefix's SwiGLU uses silu)"),
        (not isinstance(kv, int) or kv < 1 or heads % kv, f"{kv} key/value heads for {heads} heads (not a divisor)"),
        (not hf.get("head_dim") and width % heads, "hidden_size not divisible by num_attention_heads, no head_dim"),
        (not isinstance(hd, int) or hd % 2, f"head_dim {hd} (rotary embeddings need an even one)"),
        (rope_problem is not None, rope_problem),
        (hf.get("partial_rotary_factor", 1.0) != 1.0,
         f"partial_rotary_factor {hf.get('partial_rotary_factor')} (prefix rotates whole heads)"),
        (bool(hf.get("attention_bias")), "attention_bias (biases on q, k, v and o_proj; prefix has Qwen2's "
                                          "q/k/v biases only)"),
        (bool(hf.get("mlp_bias")), "mlp_bias (prefix's SwiGLU has no biases)"),
        (window is not None and not (isinstance(window, int) and window > 0), f"sliding_window {window!r}"),
    ]
    found = [text for bad, text in unsupported if bad]
    if found:
        raise InteropError(f"{where}: a {FAMILIES[family][0]} with {'; '.join(found)}, which a prefix GPT cannot "
                           "represent; use a model without it")
    return {"vocab_size": hf["vocab_size"], "seq_len": hf["max_position_embeddings"], "n_layer":
            hf["num_hidden_layers"], "n_head": heads, "d_model": width, "mlp_hidden": hf["intermediate_size"],
            "rope_theta": float(hf["rope_theta"]), "norm_eps": float(hf["rms_norm_eps"]),
            "tie_embeddings": bool(hf["tie_word_embeddings"]), "family": family,
            "n_kv_head": None if kv == heads else kv,
            "head_dim": None if width % heads == 0 and hd == width // heads else hd,
            "rope_scaling": scaling, "qkv_bias": family == "qwen2", "sliding_window": window}


def model_config(shape: dict[str, Any]) -> ModelConfig:
    """A ModelConfig from `shape_of`'s values."""
    scaling = shape["rope_scaling"]
    return ModelConfig(**{**shape, "rope_scaling": RopeScaling(**scaling) if scaling else None})


# -- reading folders ---------------------------------------------------------------------------------

def read_config(folder: Path, key: str = "") -> dict[str, Any]:
    """The folder's config.json, as `shape_of` values; `key` (e.g. "model.init_from") prefixes errors."""
    at = f"{key}: {folder}" if key else str(folder)
    if not folder.is_dir():
        raise InteropError(f"{at}: no such folder; point it at a local folder with config.json and "
                           "*.safetensors (prefix never downloads from the Hugging Face Hub)")
    path = folder / CONFIG
    if not path.is_file():
        raise InteropError(f"{at}: has no {CONFIG}; save the model there with save_pretrained, "
                           "or export it with prefix export")
    try:
        hf = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InteropError(f"{at}/{CONFIG}: not readable JSON ({e}); fix or re-save it") from None
    if not isinstance(hf, dict):
        raise InteropError(f"{at}/{CONFIG}: not a JSON object; re-save the model with save_pretrained")
    return shape_of(hf, f"{at}/{CONFIG}")
