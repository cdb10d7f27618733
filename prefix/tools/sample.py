"""`prefix sample RUN --prompt TEXT [--step N]`: text from a run's latest usable checkpoint (or the step
`checkpoint.keep_every_steps` kept in `checkpoints/step-<N>/`), with the run's tokenizer.

The checkpoint is chosen and verified as a resume would choose it (checksums, fallback to prev);
the tokenizer is the copy each start saves in `meta/tokenizer/`, so sampling needs neither the
dataset nor a GPU, and works while the run trains. `prefix sample DIR` (a folder with config.json:
a `prefix export`, or a Hugging Face Llama) samples from that folder's weights and tokenizer instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefix.errors import UserError
from prefix.runs import RunDir, add_runs_root, runs_root


def load_tokenizer(meta: Path):
    from prefix.data import tokenizers

    tokenizer = tokenizers.from_dataset(meta / tokenizers.COPY)
    if tokenizer is None:
        raise UserError(f"{meta.parent}: the run recorded no tokenizer (its data has no manifest naming one); "
                        "prepare the data with prefix data prepare to sample from its runs")
    return tokenizer


def sample(run_dir: RunDir, prompt: str, tokens: int, seed: int, temperature: float, top_k: int,
           step: int | None = None) -> str:
    import torch

    from prefix.model import GPT, complete
    from prefix.tools.export import read_checkpoint

    tokenizer = load_tokenizer(run_dir.meta) if run_dir.checkpoints.is_dir() else None
    state, name = read_checkpoint(run_dir.checkpoints, step=step)  # says "no such run" without checkpoints/
    model = GPT(state.model_config())
    model.load_state_dict(state.model)
    print(f"step {state.step} ({name})", file=sys.stderr)
    return complete(model, tokenizer, prompt, tokens, seed, torch.device("cpu"), temperature, top_k)


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run name, or a model folder (config.json + safetensors: prefix export's output)")
    p.add_argument("--prompt", default="", help="text to continue (default: none, a new document)")
    p.add_argument("--tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, help="the step checkpoint.keep_every_steps kept (checkpoints/step-<N>/)")
    add_runs_root(p)


def run(args: argparse.Namespace) -> int:
    import torch

    from prefix import pretrained
    from prefix.model import complete

    folder = Path(args.run).expanduser()
    if pretrained.is_model_folder(folder):
        if args.step is not None:
            raise UserError(f"--step {args.step}: applies to a run's kept steps, not to the model folder {folder}; "
                            "leave --step out")
        tokenizer, model = pretrained.load_tokenizer(folder), pretrained.load_model(folder)
        print(f"model folder {folder}", file=sys.stderr)
        text = complete(model, tokenizer, args.prompt, args.tokens, args.seed, torch.device("cpu"),
                        args.temperature, args.top_k)
    else:
        text = sample(RunDir(runs_root(args.runs_root) / args.run), args.prompt, args.tokens, args.seed,
                      args.temperature, args.top_k, args.step)
    print(text)
    return 0
