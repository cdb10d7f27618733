"""The `prefix` command. `prefix train ...` is `python -m prefix.train ...` (same flags, same exit codes)."""

from __future__ import annotations

import sys

COMMANDS = {"train": "train a model, resuming the run if it exists (see `prefix train --help`)",
            "chaos": "kill a 2-rank run at random until it completes; compare with an uninterrupted one"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        usage = "\n".join(f"  {name:8} {text}" for name, text in COMMANDS.items())
        print(f"usage: prefix COMMAND [ARGS]\n\ncommands:\n{usage}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] == "chaos":
        from prefix import chaos

        return chaos.main(argv[1:])
    from prefix import train

    return train.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
