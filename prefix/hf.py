"""Hugging Face interop: prefix's GPT as a `LlamaForCausalLM` folder (config.json + safetensors), both ways.

prefix's GPT is a Llama without grouped-query attention: pre-norm RMSNorm blocks, rotary attention,
a SwiGLU MLP, no biases. The conversion is a renaming plus one layout change (`mapping`, the only
place that knows the names):

- the fused `attn.qkv.weight` [3·C, C] is the row-wise concatenation [q; k; v] of `q_proj`, `k_proj`,
  `v_proj` (the forward pass views it as (3, heads, head_dim));
- rotary embeddings: prefix rotates the pairs (i, i + head_dim/2) with cos/sin halves duplicated,
  which is Hugging Face's `rotate_half` convention, so q and k rows are copied as they are (Meta's
  original checkpoints rotate interleaved pairs; their conversion script permutes rows to reach
  this layout, and an HF folder already has it);
- `tie_word_embeddings` is `model.tie_embeddings`: a tied export has no `lm_head.weight`.

`prefix export RUN --out DIR` (prefix/export.py) writes a checkpoint as such a folder; `model.init_from: DIR` starts a
fresh run from one; `prefix sample DIR` samples from one. prefix never downloads: folders are local.
See docs/interop.md.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prefix.config import ModelConfig
from prefix.errors import UserError

CONFIG, WEIGHTS, INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
"""An export also holds tokenizer/ (data.tokenizers.COPY): prefix's copy of the run's tokenizer, as in meta/."""
IGNORED = ("rotary_emb.inv_freq",)
"""Tensors older Llama saves carry that are derived, not learned: skipped on import."""
LLAMA_DEFAULTS = {"hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None,
                  "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
                  "max_position_embeddings": 2048}
"""transformers' LlamaConfig defaults for the keys a config.json may leave out."""


class InteropError(UserError):
    """A folder or checkpoint prefix cannot convert; every rank finds the same problem."""

    same_on_every_rank = True


# -- names and layouts -------------------------------------------------------------------------------

def mapping(m: ModelConfig) -> list[tuple[str, tuple[str, ...]]]:
    """(prefix name, Hugging Face names) in model order. Several HF names: the prefix tensor is their
    row-wise concatenation (dim 0), in that order. `head.weight` appears only when untied."""
    pairs = [("tok_emb.weight", ("model.embed_tokens.weight",))]
    for i in range(m.n_layer):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        pairs += [(b + "attn_norm.weight", (h + "input_layernorm.weight",)),
                  (b + "attn.qkv.weight", tuple(f"{h}self_attn.{x}_proj.weight" for x in "qkv")),
                  (b + "attn.proj.weight", (h + "self_attn.o_proj.weight",)),
                  (b + "mlp_norm.weight", (h + "post_attention_layernorm.weight",)),
                  (b + "mlp.gate.weight", (h + "mlp.gate_proj.weight",)),
                  (b + "mlp.up.weight", (h + "mlp.up_proj.weight",)),
                  (b + "mlp.down.weight", (h + "mlp.down_proj.weight",))]
    pairs.append(("norm.weight", ("model.norm.weight",)))
    if not m.tie_embeddings:
        pairs.append(("head.weight", ("lm_head.weight",)))
    return pairs


def to_hf(state: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """prefix state dict → HF tensors (separate, contiguous: safetensors refuses shared storage)."""
    out = {}
    for name, hf_names in mapping(m):
        for hf_name, part in zip(hf_names, state[name].chunk(len(hf_names), dim=0), strict=True):
            out[hf_name] = part.detach().to("cpu").clone().contiguous()
    return out


def from_hf(tensors: dict[str, torch.Tensor], m: ModelConfig, shapes: dict[str, torch.Size],
            where: str) -> dict[str, torch.Tensor]:
    """HF tensors → a prefix state dict in float32, checked against the model's `shapes`."""
    out, used = {}, set()
    for name, hf_names in mapping(m):
        want = (shapes[name][0] // len(hf_names), *shapes[name][1:])
        parts = []
        for hf_name in hf_names:
            if hf_name not in tensors:
                raise InteropError(f"{where}: the weights lack {hf_name}; export the complete model "
                                   "(save_pretrained with safe_serialization=True)")
            if tuple(tensors[hf_name].shape) != want:
                raise InteropError(f"{where}: {hf_name} has shape {list(tensors[hf_name].shape)}, config.json "
                                   f"implies {list(want)}; fix config.json or the weights")
            parts.append(tensors[hf_name].float())
            used.add(hf_name)
        out[name] = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
    if m.tie_embeddings:
        out["head.weight"] = out["tok_emb.weight"]
        used.add("lm_head.weight")  # some tied saves keep a copy; transformers ignores it too
    extra = sorted(n for n in tensors if n not in used and not n.endswith(IGNORED))
    if extra:
        raise InteropError(f"{where}: holds tensors a prefix GPT has no place for ({', '.join(extra[:3])}"
                           f"{', …' if len(extra) > 3 else ''}); only plain Llama weights can be imported")
    return out


def hf_config(m: ModelConfig, eos_id: int | None) -> dict[str, Any]:
    """config.json for `LlamaForCausalLM` describing the GPT of `m` (seq_len → max_position_embeddings)."""
    from prefix.model import mlp_width

    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": m.vocab_size,
            "hidden_size": m.d_model, "intermediate_size": mlp_width(m), "num_hidden_layers": m.n_layer,
            "num_attention_heads": m.n_head, "num_key_value_heads": m.n_head, "head_dim": m.d_model // m.n_head,
            "hidden_act": "silu", "max_position_embeddings": m.seq_len, "initializer_range": m.init_std,
            "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta, "rope_scaling": None,
            "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
            "tie_word_embeddings": m.tie_embeddings, "bos_token_id": None, "eos_token_id": eos_id,
            "pad_token_id": None, "torch_dtype": "float32", "use_cache": True}


def shape_of(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """The ModelConfig values of a Llama config.json (seq_len from max_position_embeddings); refuses
    what a prefix GPT cannot represent."""
    kind = hf.get("model_type") or ",".join(hf.get("architectures") or []) or "unknown"
    if hf.get("model_type") != "llama":
        raise InteropError(f"{where}: model_type {kind!r} is not a Llama; prefix converts LlamaForCausalLM "
                           "folders only (model_type 'llama')")
    hf = {**LLAMA_DEFAULTS, **hf}
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if not (isinstance(hf.get(k), int) and hf[k] > 0)]
    if missing:
        raise InteropError(f"{where}: lacks a positive {', '.join(missing)}; write the full config "
                           "(save_pretrained does)")
    heads, width = hf["num_attention_heads"], hf["hidden_size"]
    unsupported = [
        (hf["hidden_act"] != "silu", f"hidden_act {hf['hidden_act']!r} (prefix's SwiGLU uses silu)"),
        ((hf.get("num_key_value_heads") or heads) != heads,
         f"grouped-query attention ({hf.get('num_key_value_heads')} key/value heads for {heads} heads)"),
        ((hf.get("head_dim") or width // heads) != width // heads or width % heads,
         f"head_dim {hf.get('head_dim')} ≠ hidden_size / num_attention_heads"),
        (hf["rope_scaling"] not in (None, {}) and (hf["rope_scaling"] or {}).get("rope_type") != "default",
         f"rope_scaling {hf['rope_scaling']} (prefix has plain RoPE)"),
        (bool(hf["attention_bias"]) or bool(hf["mlp_bias"]), "biases (attention_bias / mlp_bias)"),
    ]
    found = [text for bad, text in unsupported if bad]
    if found:
        raise InteropError(f"{where}: a Llama with {'; '.join(found)}, which a prefix GPT cannot represent; "
                           "use a model without it")
    return {"vocab_size": hf["vocab_size"], "seq_len": hf["max_position_embeddings"], "n_layer":
            hf["num_hidden_layers"], "n_head": heads, "d_model": width, "mlp_hidden": hf["intermediate_size"],
            "rope_theta": float(hf["rope_theta"]), "norm_eps": float(hf["rms_norm_eps"]),
            "tie_embeddings": bool(hf["tie_word_embeddings"])}


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


def weight_files(folder: Path, at: str) -> list[Path]:
    """model.safetensors, or the shards model.safetensors.index.json names."""
    index = folder / INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise InteropError(f"{at}/{INDEX}: has no readable weight_map; re-save the model") from None
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise InteropError(f"{at}: {INDEX} names {missing[0]}, which is missing; copy every shard")
        return [folder / n for n in names]
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    other = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pth")]
    hint = f" ({other[0]} is a pickle, which prefix does not load)" if other else ""
    raise InteropError(f"{at}: has no {WEIGHTS} or {INDEX}{hint}; save the model with "
                       "save_pretrained(..., safe_serialization=True)")


def read_weights(folder: Path, at: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in weight_files(folder, at):
        try:
            tensors.update(load_file(str(path)))
        except (SafetensorError, OSError) as e:
            raise InteropError(f"{at}: {path.name} is not a readable safetensors file ({e}); "
                               "copy it again or re-save the model") from None
    return tensors


def load_weights(model: torch.nn.Module, folder: Path, at: str) -> None:
    """Copy a Llama folder's weights into `model` (a prefix GPT of the same shape)."""
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    state = from_hf(read_weights(folder, at), model.cfg, shapes, at)
    model.load_state_dict(state)


def load_model(folder: Path):
    """A prefix GPT (float32, CPU) built from an exported or Hugging Face Llama folder."""
    from prefix.model import GPT

    model = GPT(ModelConfig(**read_config(folder)))
    load_weights(model, folder, str(folder))
    return model.eval()


def is_model_folder(path: Path) -> bool:
    return (path / CONFIG).is_file()


def load_tokenizer(folder: Path):
    """prefix's copy of the run's tokenizer (tokenizer/), else the folder's tokenizer.json."""
    from prefix.data import tokenizers

    tok = tokenizers.from_dataset(folder / tokenizers.COPY)
    if tok is None and (folder / tokenizers.HF_FILE).is_file():
        tok = tokenizers.load(str(folder))
    if tok is None:
        raise UserError(f"{folder}: no tokenizer ({tokenizers.COPY}/manifest.json or tokenizer.json); export a run "
                        "whose data records its tokenizer, or copy the model's tokenizer.json there")
    return tok


# -- model.init_from ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class InitFrom:
    """A checked `model.init_from` folder: its config.json matches the model.* keys."""

    folder: Path
    shape: dict[str, Any]

    def load_into(self, model: torch.nn.Module) -> None:
        load_weights(model, self.folder, f"model.init_from: {self.folder}")


def check_init_from(m: ModelConfig) -> InitFrom:
    """Before anything is written: the folder is a Llama prefix can hold, with the configured shape.

    The model.* keys are not derived from the folder: they must match it, so the run's config.yaml
    and its checkpoints describe the model on their own (a resume never needs the folder).
    """
    from prefix.model import mlp_width

    folder = Path(m.init_from).expanduser()
    shape = read_config(folder, "model.init_from")
    weight_files(folder, f"model.init_from: {folder}")
    mine = {"vocab_size": m.vocab_size, "n_layer": m.n_layer, "n_head": m.n_head, "d_model": m.d_model,
            "mlp_hidden": mlp_width(m), "rope_theta": m.rope_theta, "norm_eps": m.norm_eps,
            "tie_embeddings": m.tie_embeddings}
    wrong = [k for k, v in mine.items() if not (v == shape[k] or isinstance(v, float)
                                                 and math.isclose(v, shape[k], rel_tol=1e-9))]
    if wrong:
        theirs = " ".join(f"model.{k}={json.dumps(shape[k])}" for k in wrong)
        ours = ", ".join(f"{k}={json.dumps(mine[k])}" for k in wrong)
        raise InteropError(f"model.init_from: {folder}/{CONFIG} describes another model than the config "
                           f"({ours}); set {theirs}")
    return InitFrom(folder, shape)


def log_init(log: Any, init: InitFrom | None, m: ModelConfig, start_step: int) -> None:
    if init is not None:
        log.info("initialised from a Hugging Face folder", init_from=str(init.folder),
                 max_position_embeddings=init.shape["seq_len"], seq_len=m.seq_len)
    elif m.init_from and start_step:
        log.info("model.init_from ignored: resuming from the checkpoint", step=start_step, init_from=m.init_from)
