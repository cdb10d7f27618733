"""The `prefix` command: one argparse parser with a subcommand per job, one way to fail.

Each command module gives `arguments(parser)` and `run(args) -> exit code`, and imports torch only
when it runs, so `prefix --help` and `prefix runs` stay fast. A problem the user can fix prints one
line `error: ...` and exits 2 (`errors.exit_code_of`); `prefix train ...` is `python -m prefix.train ...`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from typing import NoReturn

import prefix
from prefix.errors import EXIT_USER, exit_code_of, record_exit

COMMANDS = {"train": ("prefix.train", "train a model, resuming the run if it exists"),
            "runs": ("prefix.tools.runs", "list the runs under the runs root: status, step, restarts"),
            "status": ("prefix.tools.status", "one run: step, target, ETA, last checkpoint, restarts, heartbeat"),
            "report": ("prefix.tools.report", "one run's loss and throughput figures with restarts marked"),
            "sample": ("prefix.tools.sample", "generate text from a run's latest checkpoint or an exported folder"),
            "plan": ("prefix.tools.plan", "per-rank GPU memory of a config: does it fit, and what to change if not"),
            "export": ("prefix.tools.export", "write a run's checkpoint as a Hugging Face Llama folder"),
            "data": ("prefix.data.commands", "prepare datasets from text or token files, train tokenizers"),
            "chaos": ("prefix.tools.chaos", "kill a 2-rank run at random until it completes; compare with an "
                                            "uninterrupted one"),
            "simulate": ("prefix.tools.simulate", "run the Kubernetes Job's container command here and play "
                                                  "preemptions and reschedules"),
            "launch": ("prefix.tools.launch", "run torchrun as a pod's PID 1 and exit with the code a Job can act "
                                              "on (2: do not retry)")}
"""name → (module with arguments() and run(), one-line help)."""


class Parser(argparse.ArgumentParser):
    """Usage mistakes end like every other user error: one line naming the fix, exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message}; see `{self.prog} --help`", file=sys.stderr)
        record_exit(EXIT_USER)  # a worker under `prefix launch` ends here, not through exit_promptly
        sys.exit(EXIT_USER)


def command_parser(prog: str, description: str | None, arguments: Callable[[Parser], None]) -> Parser:
    """The parser of one command on its own (`python -m prefix.train`)."""
    p = Parser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    arguments(p)
    return p


def parser() -> tuple[Parser, dict[str, Parser]]:
    """The `prefix` parser and each command's own parser."""
    top = Parser(prog="prefix", description="A preemption-tolerant training daemon for language models. "
                 "Run `prefix COMMAND --help` for a command's options.")
    top.add_argument("--version", action="version", version=f"prefix {prefix.__version__}")
    sub = top.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    commands = {}
    for name, (module, text) in COMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=text, description=mod.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.arguments(p)
        p.set_defaults(entry=mod.run)
        commands[name] = p
    return top, commands


def parse(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse with `section.key=value` overrides allowed anywhere, also after flags (`... --run-name x k=v`).

    A command whose default `verbatim` names an argument gets all of its arguments there unparsed
    (`prefix launch --nproc-per-node=2 -m prefix.train --help`), unless the first is -h/--help."""
    verbatim = p.get_default("verbatim")
    if verbatim and argv and argv[0] not in ("-h", "--help"):
        args = p.parse_args([])
        setattr(args, verbatim, list(argv))
        return args
    args, extra = p.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list):
        unknown = [a for a in extra if a.startswith("-") or "=" not in a]
        if not unknown:
            args.overrides = [*args.overrides, *extra]
            return args
        extra = unknown
    if extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    top, commands = parser()
    argv = sys.argv[1:] if argv is None else argv
    # A command's arguments go to its own parser, so that overrides may follow its flags.
    args = parse(commands[argv[0]], argv[1:]) if argv and argv[0] in commands else parse(top, argv)
    return exit_code_of(args.entry, args)


if __name__ == "__main__":
    sys.exit(main())
