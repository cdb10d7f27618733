"""Reading a Hugging Face folder (config.json + safetensors): weights into a prefix GPT, whole or as each
rank's FSDP slices; `model.init_from`; a model and tokenizer to sample from. The names and layouts are
prefix.hf's; see docs/interop.md.
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
from prefix.hf import (
    CONFIG,
    FAMILIES,
    IGNORED,
    INDEX,
    WEIGHTS,
    InteropError,
    mapping,
    model_config,
    model_shape,
    read_config,
)


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


def _open(folder: Path, at: str) -> dict[str, Any]:
    """Each tensor's name → the opened safetensors file holding it (nothing read yet)."""
    from safetensors import SafetensorError, safe_open

    index: dict[str, Any] = {}
    for path in weight_files(folder, at):
        try:
            opened = safe_open(str(path), "pt")
        except (SafetensorError, OSError) as e:
            raise InteropError(f"{at}: {path.name} is not a readable safetensors file ({e}); "
                               "copy it again or re-save the model") from None
        index.update(dict.fromkeys(opened.keys(), opened))
    return index


def rows_held(param: torch.Tensor) -> tuple[int, int]:
    """The rows (dim 0) of the whole tensor this rank holds: all of them, or its FSDP shard's."""
    from prefix.distributed import dtensor_type

    if not isinstance(param, dtensor_type() or ()):
        return 0, param.shape[0]
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return offset[0], offset[0] + shape[0]


@torch.no_grad()
def load_weights(model: torch.nn.Module, folder: Path, at: str) -> None:
    """Copy a folder's weights into `model` (a prefix GPT of the same shape, whole or sharded by FSDP).

    Each parameter gets only the rows this rank holds, sliced straight out of the safetensors files, so
    a sharded rank never reads (nor holds in float32) more than its shards; cast to float32.
    """
    m, index, used = model.cfg, _open(folder, at), set()
    params = dict(model.named_parameters())
    for name, hf_names, rows in mapping(m):
        param = params[name]
        lo, hi = rows_held(param)
        pieces, offset = [], 0
        for j, hf_name in enumerate(hf_names):
            want = (rows[j] if rows else param.shape[0], *param.shape[1:])
            if hf_name not in index:
                raise InteropError(f"{at}: the weights lack {hf_name}; export the complete model "
                                   "(save_pretrained with safe_serialization=True)")
            part = index[hf_name].get_slice(hf_name)
            if tuple(part.get_shape()) != want:
                raise InteropError(f"{at}: {hf_name} has shape {list(part.get_shape())}, config.json "
                                   f"implies {list(want)}; fix config.json or the weights")
            start, stop = max(lo, offset), min(hi, offset + want[0])
            if start < stop:
                pieces.append(part[start - offset:stop - offset].float())
            offset += want[0]
            used.add(hf_name)
        local = param.to_local() if hasattr(param, "to_local") else param
        if pieces:
            local.copy_(torch.cat(pieces) if len(pieces) > 1 else pieces[0])
    if m.tie_embeddings:
        used.add("lm_head.weight")  # some tied saves keep a copy; transformers ignores it too
    extra = sorted(n for n in index if n not in used and not n.endswith(IGNORED))
    if extra:
        raise InteropError(f"{at}: holds tensors a prefix GPT has no place for ({', '.join(extra[:3])}"
                           f"{', …' if len(extra) > 3 else ''}); only the weights of a plain "
                           f"{FAMILIES[m.family][0]} can be imported")


def load_model(folder: Path):
    """A prefix GPT (float32, CPU) built from an exported or Hugging Face folder. Its context is the
    folder's max_position_embeddings, or a shorter sliding window (Mistral 7B v0.1's 4096): generating,
    it then conditions on the last `window` tokens, which is what that model itself can see."""
    from prefix.model import GPT

    shape = read_config(folder)
    if shape["sliding_window"] is not None:
        shape["seq_len"] = min(shape["seq_len"], shape["sliding_window"])
    model = GPT(model_config(shape))
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
    """Before anything is written: the folder is a model prefix can hold, with the configured shape.

    The model.* keys are not derived from the folder: they must match it, so the run's config.yaml
    and its checkpoints describe the model on their own (a resume never needs the folder).
    """
    folder = Path(m.init_from).expanduser()
    shape = read_config(folder, "model.init_from")
    weight_files(folder, f"model.init_from: {folder}")
    mine = {k: v for k, v in model_shape(m).items() if k != "seq_len"}  # seq_len is free: no learned positions
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
