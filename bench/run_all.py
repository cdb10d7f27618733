"""Run every benchmark, then write docs/benchmarks.md from their results: `make bench`.

Each script runs in a process of its own (one that fails is recorded, the others still run) and writes
bench/results/<name>.json; this script adds bench/results/machine.json and renders them all. Text below
the line `<!-- hand-written -->` in docs/benchmarks.md is kept from one rendering to the next.

  .venv/bin/python bench/run_all.py                  # every benchmark (about 25 minutes on 2 cores)
  .venv/bin/python bench/run_all.py --only startup   # one (or a few) again; the others' results are kept
  .venv/bin/python bench/run_all.py --render-only    # docs/benchmarks.md from the JSON files already there
  .venv/bin/python bench/run_all.py --quick --out /tmp/r --docs /tmp/b.md   # smoke test, quick modes
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import common

SCRIPTS = ("train_vs_bare", "model_step", "checkpoint_stall", "checkpoint_every_step", "sigterm_exit", "resume_latency", "startup",
           "restart", "data_throughput", "fsdp", "goodput")
DOCS = common.REPO / "docs" / "benchmarks.md"
KEEP = "<!-- hand-written -->"


def machine() -> dict[str, object]:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    cpu = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
               platform.processor() or "unknown")
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").is_file() else "MemTotal: 0 kB"
    ram_kb = int(next(line.split()[1] for line in meminfo.splitlines() if line.startswith("MemTotal")))
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=common.REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=common.REPO,
                           capture_output=True, text=True).stdout.strip()
    commit = (git.stdout.strip() or "unknown") + (" with uncommitted changes" if dirty else "")
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(ram_kb / 2**20, 1), "python": platform.python_version(),
            "torch": metadata.version("torch"), "commit": commit, "load_before": list(os.getloadavg()),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def run(out: Path, quick: bool, patience: float, names: list[str]) -> None:
    host, previous = machine(), out / "machine.json"
    runs = json.loads(previous.read_text()).get("runs", {}) if previous.is_file() and names != list(SCRIPTS) else {}
    for name in names:
        print(f"== {name}", flush=True)
        if not quick:  # on a shared machine: start each benchmark at a quiet moment if one comes
            noise = common.Noise()
            noise.settle(max_wait=patience, budget=patience)
            runs[name] = {"waited_s": round(noise.waited)}  # replaces an earlier run's entry
            if noise.waited > 1:
                print(f"   waited {noise.waited:.0f} s for the other processes' CPU use to drop", flush=True)
        begin = time.monotonic()
        code = subprocess.run([sys.executable, str(common.REPO / "bench" / f"{name}.py"), "--out", str(out),
                               *(["--quick"] if quick else [])], cwd=common.REPO).returncode
        runs[name] = {**runs.get(name, {}), "seconds": round(time.monotonic() - begin, 1), "exit_code": code}
        if code != 0:
            (out / f"{name}.json").unlink(missing_ok=True)  # no stale figures beside a failed run
    host.update(load_after=list(os.getloadavg()), runs=runs, quick=quick,
                total_minutes=round(sum(r["seconds"] for r in runs.values()) / 60, 1))
    out.mkdir(parents=True, exist_ok=True)
    (out / "machine.json").write_text(json.dumps(host, indent=1, ensure_ascii=False) + "\n")


def fmt(key: str, value: object) -> str:
    if value is None:
        return "not available"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(fmt(key, v) for v in value)
    if not isinstance(value, (int, float)):
        return str(value)
    if key.endswith("share"):
        return f"{100 * value:.1f} %"
    if key.endswith("bytes"):
        return f"{value / 1e6:,.1f} MB"
    if key.endswith("per_s"):
        return f"{value:,.0f}"
    if key.endswith("_s"):
        return f"{value:.3f} s" if value >= 0.1 else f"{1000 * value:.1f} ms"
    if key.endswith("params"):
        return f"{value / 1e6:.2f}M"
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def shown(check: dict) -> str:
    if check["value"] is None:
        return "not measured"
    return f"{check['value']:.3g}×" if check["unit"] == "×" else f"{check['value']:.3g} {check['unit']}"


def section(name: str, body: dict, run: dict | None) -> list[str]:
    lines = [f"## {name} (`bench/{name}.py`)", ""]
    doc = (ast.get_docstring(ast.parse((common.REPO / "bench" / f"{name}.py").read_text())) or "").split("\n")[0]
    took = f" Measured {body['date'][:16].replace('T', ' ')} UTC" + (f" in {run['seconds']:.0f} s." if run else ".")
    lines += [f"{doc} {body['setup']}.{took}" + (" **Quick mode.**" if body["quick"] else ""), ""]
    lines += ["| check | measured | goal | result |", "| --- | --- | --- | --- |"]
    lines += [f"| {c['what']} | {shown(c)} | {c['goal']} | {common.verdict(c)} |" for c in body["checks"]]
    flat = {k: v for k, v in body["figures"].items() if not isinstance(v, dict)}
    lines += ["", "| figure | value |", "| --- | --- |", *(f"| `{k}` | {fmt(k, v)} |" for k, v in flat.items())]
    tables = {k: v for k, v in body["figures"].items() if isinstance(v, dict)}
    if tables:
        rows = list(next(iter(tables.values())))
        lines += ["", "| | " + " | ".join(f"`{k}`" for k in tables) + " |", "| --- " * (len(tables) + 1) + "|"]
        lines += [f"| {r} | " + " | ".join(fmt(k, t.get(r)) for k, t in tables.items()) + " |" for r in rows]
    lines += [""] + [f"- {note}" for note in body["notes"]] + ([""] if body["notes"] else [])
    return lines


def render(out: Path, docs: Path) -> None:
    results = {n: json.loads((out / f"{n}.json").read_text()) for n in SCRIPTS if (out / f"{n}.json").is_file()}
    host = json.loads((out / "machine.json").read_text()) if (out / "machine.json").is_file() else machine()
    runs = host.get("runs", {})
    lines = ["# Benchmarks", "",
             "Generated by `bench/run_all.py` from `bench/results/*.json`. Reproduce with `make bench` "
             f"(all of them, {host.get('total_minutes', '?')} minutes here), or one with "
             "`.venv/bin/python bench/<name>.py` (`--quick`: seconds, a smoke test). Every result is a ratio of two "
             "measurements taken side by side in the same run, never one absolute time; on a shared 2-core machine "
             "single runs move by ±10 % (more when other processes are busy), hence the repetitions and medians.", "",
             "## Summary", "", "| benchmark | check | measured | goal | result |", "| --- | --- | --- | --- | --- |"]
    for name, body in results.items():
        lines += [f"| [{name}](#{name}-bench{name}py) | {c['what']} | {shown(c)} | {c['goal']} | {common.verdict(c)} |"
                  for c in body["checks"] if c["goal"] != "—"]
    for name in SCRIPTS:
        if name in runs and runs[name]["exit_code"] != 0:
            lines.append(f"| {name} | **failed** (exit code {runs[name]['exit_code']}) | | | |")
    load = lambda k: ", ".join(f"{x:.1f}" for x in host.get(k, [])) or "?"  # noqa: E731
    lines += ["", "## Machine", "", f"- CPU: {host['cpu']}, {host['cores']} cores; RAM {host['ram_gib']} GiB",
              f"- Python {host['python']}, torch {host['torch']}; commit {host['commit']}",
              f"- date {host['date']}; load average (1, 5, 15 min) before {load('load_before')}, after "
              f"{load('load_after')}", ""]
    for name, body in results.items():
        lines += section(name, body, runs.get(name))
    text = "\n".join(lines)
    old = docs.read_text() if docs.is_file() else ""
    text += "\n" + (old[old.index(KEEP):] if KEEP in old else KEEP + "\n")
    docs.write_text(text)
    print(f"wrote {docs}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="every benchmark's quick mode (a smoke test)")
    p.add_argument("--render-only", action="store_true", help="no runs: render the results already in --out")
    p.add_argument("--out", type=Path, default=common.RESULTS, help="results folder (default bench/results)")
    p.add_argument("--docs", type=Path, default=DOCS, help="the Markdown file to write (default docs/benchmarks.md)")
    p.add_argument("--patience", type=float, default=600, help="seconds to wait before each benchmark for the "
                   "machine's other processes to go quiet (default 600)")
    p.add_argument("--only", nargs="+", choices=SCRIPTS, default=list(SCRIPTS), metavar="NAME",
                   help="run these benchmarks only (the others' results stay as they are)")
    args = p.parse_args()
    if not args.render_only:
        run(args.out, args.quick, args.patience, args.only)
    render(args.out, args.docs)


if __name__ == "__main__":
    main()
