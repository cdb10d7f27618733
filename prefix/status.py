"""`prefix runs` (every run at a glance) and `prefix status RUN` (one run in detail).

Both only read: the registry for the list, the run directory itself for the details, so they work
while the run trains, after it died, and on a copy of the runs volume.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from prefix import goodput
from prefix.errors import UserError
from prefix.registry import STATUSES, Registry
from prefix.runs import RunDir, read_jsonl, runs_root
from prefix.watchdog import read_heartbeat


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def table(rows: list[dict[str, Any]], now: float) -> str:
    header = ("RUN", "EXPERIMENT", "STATUS", "STEP", "TARGET", "RESTARTS", "EXIT", "UPDATED")
    lines = [header] + [(r["run"], r["experiment"] or "-", r["status"] or "-", str(r["step"] or 0),
                         str(r["target_step"] or "-"), str(r["restarts"] or 0),
                         "-" if r["exit_code"] is None else str(r["exit_code"]),
                         age(now - r["updated"]) + " ago" if r["updated"] else "-") for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


def details(run_dir: RunDir, now: float) -> dict[str, Any]:
    """What `prefix status` prints, as data (also used by the report)."""
    state = run_dir.state()
    if not state:
        raise UserError(f"{run_dir.path}: not a run directory of this prefix (meta/run.json missing); "
                        "check the run name and --runs-root")
    recent = read_jsonl(run_dir.metrics / "train.jsonl")[-20:]
    step_times = [r["step_time"] for r in recent if "step_time" in r]
    step, target = int(state.get("step") or 0), int(state.get("target_step") or 0)
    heartbeat = read_heartbeat(run_dir)
    if heartbeat is not None:
        step = max(step, int(heartbeat.get("step", 0)))
    latest = run_dir.checkpoints / "latest.pt"
    eta = (target - step) * sum(step_times) / len(step_times) if step_times and state.get("status") == "running" \
        else None
    return {"run": run_dir.path.name, "experiment": state.get("experiment"), "status": state.get("status"),
            "step": step, "target_step": target, "eta_s": eta,
            "last_checkpoint_age_s": now - latest.stat().st_mtime if latest.is_file() else None,
            "restarts": state.get("restarts", 0), "exit_code": state.get("exit_code"),
            "heartbeat_age_s": now - heartbeat["time"] if heartbeat else None,
            "starts": run_dir.starts(), "goodput": goodput.account(run_dir.metrics)}


def describe(d: dict[str, Any]) -> str:
    ends = [s.get("previous_end") for s in d["starts"][1:]]
    redone = sum(s.get("steps_redone", 0) for s in d["starts"])
    lines = [f"run         {d['run']} ({d['experiment']})",
             f"status      {d['status']}" + (f" (exit {d['exit_code']})" if d["exit_code"] is not None else ""),
             f"step        {d['step']} / {d['target_step']}" + (f", ETA {age(d['eta_s'])}" if d["eta_s"] else ""),
             f"checkpoint  latest.pt, {age(d['last_checkpoint_age_s'])} old" if d["last_checkpoint_age_s"]
             is not None else "checkpoint  none yet",
             f"restarts    {d['restarts']}" + (f" ({', '.join(ends)}; {redone} steps redone)" if ends else ""),
             f"heartbeat   {age(d['heartbeat_age_s'])} ago" if d["heartbeat_age_s"] is not None
             else "heartbeat   none", goodput.describe(d["goodput"])]
    return "\n".join(lines)


def runs_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="prefix runs", description="Every run under the runs root, newest first.")
    p.add_argument("--runs-root", help="folder of run directories (default: $PREFIX_RUNS_ROOT, else ./runs)")
    p.add_argument("--experiment", help="only runs of this experiment")
    p.add_argument("--status", choices=STATUSES, help="only runs with this status")
    p.add_argument("--reindex", action="store_true", help="rebuild the registry from the run directories first")
    p.add_argument("--json", action="store_true", help="one JSON object per run instead of a table")
    args = p.parse_args(argv)
    registry = Registry(runs_root(args.runs_root))
    if args.reindex:
        print(f"reindexed {registry.reindex()} runs from {registry.root}", file=sys.stderr)
    rows = registry.runs(args.experiment, args.status)
    print("\n".join(json.dumps(r) for r in rows) if args.json else table(rows, time.time()))
    return 0


def status_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="prefix status", description="One run: step, ETA, checkpoint, restarts.")
    p.add_argument("run", help="run name")
    p.add_argument("--runs-root", help="folder of run directories (default: $PREFIX_RUNS_ROOT, else ./runs)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    try:
        d = details(RunDir(runs_root(args.runs_root) / args.run), time.time())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(json.dumps(d, indent=2) if args.json else describe(d))
    return 0
