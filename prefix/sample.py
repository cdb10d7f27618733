"""`prefix sample RUN --prompt TEXT`: text from a run's latest usable checkpoint, with the run's tokenizer.

The checkpoint is chosen and verified as a resume would choose it (checksums, fallback to prev);
the tokenizer is the copy each start saves in `meta/tokenizer/`, so sampling needs neither the
dataset nor a GPU, and works while the run trains. `prefix sample DIR` (a folder with config.json:
a `prefix export`, or a Hugging Face Llama) samples from that folder's weights and tokenizer instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from prefix.errors import UserError
from prefix.runs import RunDir, runs_root

TOKENIZER = "tokenizer"
"""meta/tokenizer/: the tokenizer's files and a manifest.json naming it, as in a prepared dataset."""


def save_tokenizer(meta: Path, tokenizer) -> None:
    folder = meta / TOKENIZER
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({"tokenizer": tokenizer.save(folder)}))


def load_tokenizer(meta: Path):
    from prefix.data import tokenizers

    tokenizer = tokenizers.from_dataset(meta / TOKENIZER)
    if tokenizer is None:
        raise UserError(f"{meta.parent}: the run recorded no tokenizer (its data has no manifest naming one); "
                        "prepare the data with prefix data prepare to sample from its runs")
    return tokenizer


def generate(model, tokenizer, prompt: str, tokens: int, seed: int, device: torch.device,
             temperature: float = 0.8, top_k: int | None = 40) -> str:
    """The prompt and `tokens` sampled continuations, decoded (deterministic for a seed)."""
    ids = torch.tensor(tokenizer.encode(prompt), dtype=torch.long, device=device)[None]
    gen = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(ids, tokens, temperature=temperature, top_k=top_k, generator=gen)
    return tokenizer.decode(out[0].tolist())


def sample(run_dir: RunDir, prompt: str, tokens: int, seed: int, temperature: float, top_k: int) -> str:
    from prefix import config
    from prefix.checkpoint.files import global_name
    from prefix.checkpoint.resume import choose
    from prefix.model import GPT

    if not run_dir.checkpoints.is_dir():
        raise UserError(f"{run_dir.path}: no such run (checkpoints/ missing); check the name and --runs-root")
    tokenizer = load_tokenizer(run_dir.meta)
    choice, _ = choose(run_dir.checkpoints, world_size=1)  # raises NoUsableCheckpoint, a UserError
    if choice is None:
        raise UserError(f"{run_dir.path}: no checkpoint yet; wait for the first one (checkpoint.every_steps)")
    state = torch.load(run_dir.checkpoints / global_name(choice.global_slot), map_location="cpu", weights_only=True)
    model = GPT(config.from_dict(state["config"]).model)
    model.load_state_dict(state["model"])
    print(f"step {state['step']} ({global_name(choice.global_slot)})", file=sys.stderr)
    return generate(model, tokenizer, prompt, tokens, seed, torch.device("cpu"), temperature, top_k)


def main(argv: list[str] | None = None) -> int:
    from prefix import hf

    p = argparse.ArgumentParser(prog="prefix sample", description=__doc__.splitlines()[0])
    p.add_argument("run", help="run name, or a model folder (config.json + safetensors: prefix export's output)")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs-root", help="folder of run directories (default: $PREFIX_RUNS_ROOT, else ./runs)")
    args = p.parse_args(argv)
    try:
        if hf.is_model_folder(Path(args.run).expanduser()):
            folder = Path(args.run).expanduser()
            tokenizer, model = hf.load_tokenizer(folder), hf.load_model(folder)
            print(f"model folder {folder}", file=sys.stderr)
            text = generate(model, tokenizer, args.prompt, args.tokens, args.seed, torch.device("cpu"),
                            args.temperature, args.top_k)
        else:
            text = sample(RunDir(runs_root(args.runs_root) / args.run), args.prompt, args.tokens, args.seed,
                          args.temperature, args.top_k)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
