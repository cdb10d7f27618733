"""`prefix export RUN --out DIR [--step N]`: a run's checkpoint as a Hugging Face folder (prefix.hf converts).

The folder holds `model.safetensors`, a `config.json` for the run's `model.family` (`LlamaForCausalLM`,
`MistralForCausalLM` or `Qwen2ForCausalLM`), prefix's copy of the run's tokenizer (`tokenizer/`) and,
where transformers can use it, `tokenizer.json`. It is written
under a temporary name and renamed into place, so an interrupted export never looks finished.
`--step N` exports the step `checkpoint.keep_every_steps` kept in `checkpoints/step-<N>/` (verified whole
first); `read_checkpoint` is the one reading of a run's checkpoint that `prefix sample` shares.
See docs/interop.md and docs/checkpoints.md#history.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from prefix.errors import UserError
from prefix.runs import RunDir, add_runs_root, runs_root

if TYPE_CHECKING:
    from prefix.state import TrainState


def _byte_chars() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes: what tokenizers' ByteLevel maps bytes to."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def byte_tokenizer_json(path: Path) -> None:
    """A Hugging Face tokenizer.json that gives prefix's byte ids: byte b → id b, <|endoftext|> → 256."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from prefix.data.tokenizers import ENDOFTEXT

    tok = Tokenizer(models.BPE(vocab={c: b for b, c in enumerate(_byte_chars())}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([ENDOFTEXT])
    tok.save(str(path))


def write_tokenizer(folder: Path, tokenizer, seq_len: int) -> list[str]:
    """prefix's copy (tokenizer/) and, where one exists, a tokenizer transformers loads; returns names."""
    from prefix.data import tokenizers

    tokenizers.save_copy(folder, tokenizer)  # folder/tokenizer/manifest.json + files: what prefix sample reads
    if tokenizer.kind == "bytes":
        byte_tokenizer_json(folder / "tokenizer.json")
        eos = "<|endoftext|>"
    elif tokenizer.kind == "huggingface":
        shutil.copyfile(folder / tokenizers.COPY / "tokenizer.json", folder / "tokenizer.json")
        eos = tokenizer._tok.id_to_token(tokenizer.eod_id)
    else:  # tiktoken: transformers has no loader for a rank file
        return [f"{tokenizers.COPY}/"]
    # model_input_names: PreTrainedTokenizerFast's default also returns token_type_ids, which
    # the *ForCausalLM models do not take (`model.generate(**tok(text, return_tensors="pt"))` would fail).
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "model_max_length": seq_len,
         "model_input_names": ["input_ids", "attention_mask"], "clean_up_tokenization_spaces": False},
        indent=2) + "\n")
    return [f"{tokenizers.COPY}/", "tokenizer.json", "tokenizer_config.json"]


def read_checkpoint(checkpoints: Path, which: str = "latest", step: int | None = None) -> tuple[TrainState, str]:
    """`read_verified(checkpoints, which)`, or with `step` the kept step's folder, verified whole; (TrainState, name)."""
    from prefix.checkpoint import global_name, history
    from prefix.state import read_verified

    if step is None:
        return read_verified(checkpoints, which)
    if which != "latest":
        raise UserError(f"--step {step} and --checkpoint {which}: pass one of them")
    folder = history.verified(checkpoints, step)
    state, _ = read_verified(checkpoints, str(folder / global_name("latest")))  # verified above: read it
    return state, f"{folder.name}/"


def export(run_dir, out: Path, which: str = "latest", force: bool = False, step: int | None = None) -> str:
    """Write the checkpoint (`which`, or the kept `step`) as a Hugging Face folder of its model.family at `out`;
    returns a one-line summary."""
    from safetensors.torch import save_file

    from prefix.data import tokenizers
    from prefix.data.corpus import commit, staging
    from prefix.hf import CONFIG, WEIGHTS, hf_config, to_hf

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out}: not empty; pass --force to replace it, or choose another --out")
    state, name = read_checkpoint(run_dir.checkpoints, which, step)
    m = state.model_config()
    tokenizer = tokenizers.from_dataset(run_dir.meta / tokenizers.COPY)
    tensors = to_hf(state.model, m)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging(out)
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})  # transformers wants the format
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp / WEIGHTS, 0o666 & ~umask)  # save_file creates it private
        eos = tokenizer.eod_id if tokenizer is not None else None
        (tmp / CONFIG).write_text(json.dumps(hf_config(m, eos), indent=2) + "\n")
        files = [WEIGHTS, CONFIG] + (write_tokenizer(tmp, tokenizer, m.seq_len) if tokenizer else [])
        commit(tmp, out, overwrite=True)  # emptiness (or --force) was checked above
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    params = sum(t.numel() for t in tensors.values())
    return (f"exported step {state.step} ({name}, {params:,} parameters) to {out}: {', '.join(files)}"
            + ("" if tokenizer else " (the run recorded no tokenizer)"))


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run name")
    p.add_argument("--out", required=True, help="folder to write (created; must be empty unless --force)")
    p.add_argument("--checkpoint", default="latest",
                   help="latest (the newest verified checkpoint, as a resume picks it), prev, or a file path")
    p.add_argument("--step", type=int, help="the step checkpoint.keep_every_steps kept (checkpoints/step-<N>/)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    add_runs_root(p)


def run(args: argparse.Namespace) -> int:
    print(export(RunDir(runs_root(args.runs_root) / args.run), Path(args.out).expanduser(), args.checkpoint,
                 args.force, args.step))
    return 0
