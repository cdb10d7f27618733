"""`prefix export RUN --out DIR`: a run's checkpoint as a Hugging Face Llama folder (prefix.hf converts).

The folder holds `model.safetensors`, a `config.json` for `LlamaForCausalLM`, prefix's copy of the
run's tokenizer (`tokenizer/`) and, where transformers can use it, `tokenizer.json`. It is written
under a temporary name and renamed into place, so an interrupted export never looks finished.
See docs/interop.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from prefix.errors import UserError
from prefix.hf import CONFIG, WEIGHTS, hf_config, to_hf
from prefix.sample import TOKENIZER


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
    from prefix.sample import save_tokenizer

    save_tokenizer(folder, tokenizer)  # folder/tokenizer/manifest.json + files: what prefix sample reads
    if tokenizer.kind == "bytes":
        byte_tokenizer_json(folder / "tokenizer.json")
        eos = "<|endoftext|>"
    elif tokenizer.kind == "huggingface":
        shutil.copyfile(folder / TOKENIZER / "tokenizer.json", folder / "tokenizer.json")
        eos = tokenizer._tok.id_to_token(tokenizer.eod_id)
    else:  # tiktoken: transformers has no loader for a rank file
        return [f"{TOKENIZER}/"]
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "model_max_length": seq_len,
         "clean_up_tokenization_spaces": False}, indent=2) + "\n")
    return [f"{TOKENIZER}/", "tokenizer.json", "tokenizer_config.json"]


def read_checkpoint(run_dir, which: str) -> tuple[dict[str, Any], str]:
    """The global checkpoint file to export, verified like a resume verifies it; and its name."""
    from prefix.checkpoint import choose, global_name
    from prefix.checkpoint.files import FORMAT_VERSION, file_sum, read_manifests

    folder = run_dir.checkpoints
    if which == "latest":
        if not folder.is_dir():
            raise UserError(f"{run_dir.path}: no such run (checkpoints/ missing); check the name and --runs-root")
        choice, _ = choose(folder, world_size=1)  # raises NoUsableCheckpoint, a UserError
        if choice is None:
            raise UserError(f"{run_dir.path}: no checkpoint yet; wait for the first one (checkpoint.every_steps)")
        path = folder / global_name(choice.global_slot)
    elif which == "prev":
        path = folder / global_name("prev")
        if not path.is_file():
            raise UserError(f"{path}: no previous checkpoint; export latest, or pass --checkpoint PATH")
        checksum = file_sum(path)
        if not any(m.lists("global", checksum) for m in read_manifests(folder)[0]):
            raise UserError(f"{path}: no manifest lists its checksum (damaged or unverifiable); "
                            "export latest, or pass its path to --checkpoint to export it unverified")
    else:
        path = Path(which).expanduser()
        if not path.is_file():
            raise UserError(f"--checkpoint {which}: no such file; pass latest, prev or a checkpoint's path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (a pickle that runs code, a truncated zip, garbage: torch raises several)
        raise UserError(f"{path}: does not load as a checkpoint ({type(e).__name__}); pass another "
                        "--checkpoint") from None
    if not isinstance(state, dict) or not {"model", "config"} <= state.keys():
        raise UserError(f"{path}: not a global checkpoint (latest.pt / prev.pt: model and config); "
                        "pass one of those to --checkpoint")
    if state.get("format_version") not in (None, FORMAT_VERSION):
        raise UserError(f"{path}: written in checkpoint format {state.get('format_version')}; this prefix "
                        f"reads format {FORMAT_VERSION}")
    return state, path.name


def export(run_dir, out: Path, which: str = "latest", force: bool = False) -> str:
    """Write the checkpoint as a LlamaForCausalLM folder at `out`; returns a one-line summary."""
    from safetensors.torch import save_file

    from prefix import config
    from prefix.data import tokenizers
    from prefix.data.corpus import commit, staging

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out}: not empty; pass --force to replace it, or choose another --out")
    state, name = read_checkpoint(run_dir, which)
    m = config.from_dict(state["config"]).model
    tokenizer = tokenizers.from_dataset(run_dir.meta / TOKENIZER)
    tensors = to_hf(state["model"], m)
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
    return (f"exported step {state.get('step')} ({name}, {params:,} parameters) to {out}: {', '.join(files)}"
            + ("" if tokenizer else " (the run recorded no tokenizer)"))


def export_main(argv: list[str] | None = None) -> int:
    from prefix.runs import RunDir, runs_root

    p = argparse.ArgumentParser(prog="prefix export", description="Write a run's checkpoint as a Hugging Face "
                                "LlamaForCausalLM folder: model.safetensors, config.json and the tokenizer.")
    p.add_argument("run", help="run name")
    p.add_argument("--out", required=True, help="folder to write (created; must be empty unless --force)")
    p.add_argument("--checkpoint", default="latest",
                   help="latest (the newest verified checkpoint, as a resume picks it), prev, or a file path")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--runs-root", help="folder of run directories (default: $PREFIX_RUNS_ROOT, else ./runs)")
    args = p.parse_args(argv)
    try:
        line = export(RunDir(runs_root(args.runs_root) / args.run), Path(args.out).expanduser(),
                      args.checkpoint, args.force)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(line)
    return 0
