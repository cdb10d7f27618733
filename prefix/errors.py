"""The one exception type for mistakes a user can fix.

Its message is a single line naming the problem and the fix; entry points print it and exit 2
without a traceback. Anything else escaping is a bug or a crash, and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix (configuration, data, paths, checkpoints)."""

    exit_code = 2
    same_on_every_rank = False
    """True when every rank raises the same error (config, checkpoints): only rank 0 prints it."""
