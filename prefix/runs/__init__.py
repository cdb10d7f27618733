"""The run directory and what a run records about itself: layout, manager, registry, goodput, environment.

`from prefix.runs import RunDir` names the run directory contract (layout.py); the manager, the
registry and the goodput ledger are imported from their modules.
"""

from prefix.runs.layout import RunDir, add_runs_root, check_run_name, read_jsonl, runs_root, write_atomically

__all__ = ["RunDir", "add_runs_root", "check_run_name", "read_jsonl", "runs_root", "write_atomically"]
