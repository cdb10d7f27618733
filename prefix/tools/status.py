"""`prefix status RUN`: one run in detail (step, ETA, last checkpoint, restarts, heartbeat, goodput).

It only reads the run directory, so it works while the run trains, after it died, and on a copy
of the runs volume.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from prefix.errors import UserError
from prefix.runs import RunDir, add_runs_root, goodput, lease, read_jsonl, runs_root
from prefix.watchdog import read_heartbeat


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


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
            "starts": run_dir.starts(), "goodput": goodput.account(run_dir.metrics),
            "lease": lease.status(run_dir.path, now)}


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
             else "heartbeat   none", describe_lease(d["lease"]), goodput.describe(d["goodput"])]
    return "\n".join(lines)


def describe_lease(held: dict[str, Any] | None) -> str:
    if held is None:
        return "lease       none (no start has held this run)"
    state = "released" if held["released"] else "stopping (final checkpoint), " if held["stopping"] else ""
    renewed = f"renewed {age(held['renewed_age_s'])} ago" if not held["released"] else ""
    return f"lease       {held['holder']}: {state}{renewed}".rstrip(", ")


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run name")
    add_runs_root(p)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")


def run(args: argparse.Namespace) -> int:
    d = details(RunDir(runs_root(args.runs_root) / args.run), time.time())
    print(json.dumps(d, indent=2) if args.json else describe(d))
    return 0
