"""The `prefix` command. `prefix train ...` is `python -m prefix.train ...` (same flags, same exit codes)."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {"train": "train a model, resuming the run if it exists (see `prefix train --help`)",
            "chaos": "kill a 2-rank run at random until it completes; compare with an uninterrupted one",
            "simulate": "run the Kubernetes Job's container command here and play preemptions and reschedules",
            "data": "prepare datasets from text or token files, train tokenizers (see `prefix data --help`)",
            "runs": "list the runs under the runs root: status, step, restarts (--reindex rebuilds the index)",
            "status": "one run: step, target, ETA, last checkpoint, restarts, heartbeat",
            "sample": "generate text from a run's latest checkpoint, or an exported folder, with its tokenizer",
            "report": "one run's loss and throughput figures with restarts marked, and a markdown summary",
            "export": "write a run's checkpoint as a Hugging Face Llama folder (safetensors, config, tokenizer)"}
MODULES = {"data": "prefix.data.commands", "runs": "prefix.status:runs_main", "status": "prefix.status:status_main",
           "export": "prefix.export:export_main"}
"""Commands whose entry point is not `prefix.<command>:main`."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        usage = "\n".join(f"  {name:9} {text}" for name, text in COMMANDS.items())
        print(f"usage: prefix COMMAND [ARGS]\n\ncommands:\n{usage}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module, _, function = MODULES.get(argv[0], f"prefix.{argv[0]}").partition(":")
    return getattr(importlib.import_module(module), function or "main")(argv[1:])  # on use: torch is slow


if __name__ == "__main__":
    sys.exit(main())
