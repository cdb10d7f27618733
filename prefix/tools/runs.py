"""`prefix runs`: every run under the runs root at a glance, newest first, from the registry.

The registry (`<runs root>/registry.sqlite`) is only an index of each run's meta/run.json: a root
without one (copied from another volume, or written by an older prefix) is indexed on first use.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from prefix.errors import UserError
from prefix.runs import add_runs_root, runs_root
from prefix.runs.layout import STATUSES
from prefix.runs.registry import Registry
from prefix.tools.status import age


def table(rows: list[dict[str, Any]], now: float) -> str:
    header = ("RUN", "EXPERIMENT", "STATUS", "STEP", "TARGET", "RESTARTS", "EXIT", "UPDATED")
    lines = [header] + [(r["run"], r["experiment"] or "-", r["status"] or "-", str(r["step"] or 0),
                         str(r["target_step"] or "-"), str(r["restarts"] or 0),
                         "-" if r["exit_code"] is None else str(r["exit_code"]),
                         age(now - r["updated"]) + " ago" if r["updated"] else "-") for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


def arguments(p: argparse.ArgumentParser) -> None:
    add_runs_root(p)
    p.add_argument("--experiment", help="only runs of this experiment")
    p.add_argument("--status", choices=STATUSES, help="only runs with this status")
    p.add_argument("--reindex", action="store_true", help="rebuild the registry from the run directories first")
    p.add_argument("--json", action="store_true", help="one JSON object per run instead of a table")


def run(args: argparse.Namespace) -> int:
    root = runs_root(args.runs_root)
    if not root.is_dir():
        raise UserError(f"{root}: no such runs root; pass --runs-root (or set PREFIX_RUNS_ROOT) to the folder "
                        "that holds your run directories")
    registry = Registry(root)
    if args.reindex or not registry.path.is_file():
        found = registry.reindex()
        print(f"{'reindexed' if args.reindex else 'indexed'} {found} runs from {root} "
              f"({registry.path.name} {'rebuilt' if args.reindex else 'was missing'})", file=sys.stderr)
    rows = registry.runs(args.experiment, args.status)
    if not rows and not args.json:
        print(f"no runs under {root}" + (" matching the filters" if args.experiment or args.status else
                                         "; start one with `prefix train --config FILE --run-name NAME`"),
              file=sys.stderr)
        return 0
    print("\n".join(json.dumps(r) for r in rows) if args.json else table(rows, time.time()))
    return 0
