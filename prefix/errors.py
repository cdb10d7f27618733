"""The one exception type for mistakes a user can fix, and the one place that turns it into an exit.

Its message is a single line naming the problem and the fix; entry points print it and exit 2
without a traceback. Anything else escaping is a bug or a crash, and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

EXIT_BROKEN_PIPE = 141
"""128 + SIGPIPE: what `prefix runs | head` exits with once head stopped reading, like a shell tool."""
EXIT_USER = 2
"""A problem the user can fix: the same start would fail the same way (a Job must not retry it)."""
EXIT_FENCED = 3
"""Another start took the run's lease over (this one was frozen or cut off): it wrote nothing and left."""
EXIT_DIR = "PREFIX_EXIT_DIR"
"""Set by `prefix launch`: each worker records its exit code there, since torchrun reports only 1."""


def record_exit(code: int) -> None:
    """Tell `prefix launch` (when it started us) how this worker ends: `$PREFIX_EXIT_DIR/rank<RANK>`."""
    folder = os.environ.get(EXIT_DIR)
    if folder:
        try:
            with open(os.path.join(folder, f"rank{os.environ.get('RANK', '0')}"), "w") as f:
                f.write(str(code))
        except OSError:
            pass  # the launcher then treats this worker as crashed: a retry, never a lost run


class UserError(Exception):
    """A problem the user can fix (configuration, data, paths, checkpoints)."""

    exit_code = EXIT_USER
    same_on_every_rank = False
    """True when every rank raises the same error (config, checkpoints): only rank 0 prints it."""


def report(error: UserError, quiet: bool = False) -> int:
    """Print the error's one line (unless `quiet`: another rank prints it) and return its exit code."""
    if not quiet:
        print(f"error: {error}", file=sys.stderr)
    return error.exit_code


def exit_code_of(command: Callable[..., int], *args: Any) -> int:
    """Run a command: a UserError becomes its one line and exit code; a reader that went away
    (`prefix runs | head`) ends it quietly instead of with a BrokenPipeError traceback."""
    try:
        code = command(*args)
        sys.stdout.flush()  # a closed pipe shows up here, inside the handler below
        return code
    except UserError as e:
        return report(e)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush must not fail again
        return EXIT_BROKEN_PIPE
