"""`prefix report RUN`: loss, loss over wall-clock time and throughput figures, and a markdown summary.

Reads only the run directory (metrics/, meta/, logs/heartbeat.json), so it works while the run
trains, after it died and on a copy. Writes loss.png, loss_time.png, throughput.png, summary.md and
report.json (the restarts and gaps it marked) into --out (default: `<run dir>/report/`).
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefix.errors import UserError
from prefix.runs import RunDir, add_runs_root, read_jsonl, runs_root
from prefix.runs.layout import PREVIOUS_END
from prefix.tools.status import age, details

SIZE_IN, DPI = (10, 5), 100
FIGURES = ("loss.png", "loss_time.png", "throughput.png")
END_COLOURS = {PREVIOUS_END["preempted"]: "tab:orange", PREVIOUS_END["running"]: "tab:red",
               PREVIOUS_END["crashed"]: "tab:purple", PREVIOUS_END["completed"]: "tab:gray"}
OTHER_END = "black"


def _number(row: dict[str, Any], field: str) -> bool:
    return isinstance(row.get(field), (int, float)) and not isinstance(row.get(field), bool)


def by_step(rows: list[dict[str, Any]], field: str) -> tuple[list[int], list[float]]:
    """`field` per step, sorted by step; a step redone after a kill keeps its LAST line (the one that counts)."""
    last = {int(r["step"]): float(r[field]) for r in rows if _number(r, "step") and _number(r, field)}
    steps = sorted(last)
    return steps, [last[s] for s in steps]


def by_time(rows: list[dict[str, Any]], field: str) -> list[tuple[float, float]]:
    """Every line with `field` and a `time`, in time order (redone steps included)."""
    return sorted((float(r["time"]), float(r[field])) for r in rows if _number(r, "time") and _number(r, field))


def _markers(ax: Any, restarts: list[dict[str, Any]], key: str) -> None:
    labelled = set()
    for r in restarts:
        end = r["previous_end"]
        ax.axvline(r[key], color=END_COLOURS.get(end, OTHER_END), linewidth=1.5, zorder=1,
                   label=None if end in labelled else f"restart: {end}")
        labelled.add(end)


def _gaps(ax: Any, gaps: list[list[float]]) -> None:
    for i, (a, b) in enumerate(gaps):
        ax.axvspan(a, b, color="0.85", zorder=0, label=None if i else "not running")


def _segments(points: list[tuple[float, float]], cuts: list[float]) -> list[tuple[list[float], list[float]]]:
    """Split a time series at the restart times so a line never bridges a gap."""
    out: list[tuple[list[float], list[float]]] = [([], []) for _ in range(len(cuts) + 1)]
    for t, v in points:
        i = sum(t >= c for c in cuts)
        out[i][0].append(t)
        out[i][1].append(v)
    return [s for s in out if s[0]]


def _plot_time(ax: Any, points: list[tuple[float, float]], cuts: list[float], t0: float, **style: Any) -> None:
    label = style.pop("label")
    for i, (ts, vs) in enumerate(_segments(points, cuts)):
        ax.plot([(t - t0) / 3600 for t in ts], vs, label=label if i == 0 else None, **style)


def build(run_dir: RunDir, out: Path, now: float) -> dict[str, Any]:
    """Check the run, then write the figures, summary.md and report.json; return what report.json holds."""
    facts = details(run_dir, now)  # UserError when meta/run.json is missing
    train = read_jsonl(run_dir.metrics / "train.jsonl")
    evals = read_jsonl(run_dir.metrics / "eval.jsonl")
    steps, losses = by_step(train, "loss")
    if not steps:
        raise UserError(f"{run_dir.metrics / 'train.jsonl'}: no training metrics yet; run `prefix report` "
                        "again once the run has logged a step")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out}: cannot create the report folder ({e.strerror}); choose another --out") from None

    import matplotlib
    matplotlib.use("Agg")  # no display; before pyplot is imported
    import matplotlib.pyplot as plt

    started = time.perf_counter()
    starts = facts["starts"]
    times = [t for t, _ in by_time(train + evals, "step")]
    t0 = float(starts[0]["time"]) if starts and _number(starts[0], "time") else min(times, default=0.0)
    restarts, gaps = [], []
    for i, s in enumerate(starts[1:], 1):
        at = float(s.get("time", t0))
        before = max([t for t in times if t < at] + [float(starts[i - 1].get("time", t0))])
        gaps.append([(before - t0) / 3600, (at - t0) / 3600])
        restarts.append({"restart": i, "start_step": int(s.get("start_step", 0)), "hours": (at - t0) / 3600,
                         "previous_end": s.get("previous_end") or "unknown",
                         "steps_redone": int(s.get("steps_redone") or 0)})
    cuts = [float(s.get("time", t0)) for s in starts[1:]]
    val_steps, val_losses = by_step(evals, "val_loss")
    written, pixels = [], {}

    def save(fig: Any, ax: Any, name: str, title: str, xlabel: str, ylabel: str, key: str) -> None:
        ax.set(title=f"{facts['run']}: {title}", xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        fig.legend(loc="outside lower center", ncols=4, fontsize="small", frameon=False)  # never over the data
        try:
            fig.savefig(out / name, dpi=DPI)
        except OSError as e:
            plt.close(fig)
            raise UserError(f"{out / name}: cannot write ({e.strerror}); free some space or choose "
                            "another --out") from None
        pixels[name] = [round(float(ax.transData.transform((r[key], 0))[0]), 1) for r in restarts]
        plt.close(fig)
        written.append(out / name)

    fig, ax = plt.subplots(figsize=SIZE_IN, dpi=DPI, layout="constrained")
    ax.plot(steps, losses, color="tab:blue", linewidth=1, label="train loss")
    if val_steps:
        ax.plot(val_steps, val_losses, "o-", color="tab:green", markersize=3, label="val loss")
    _markers(ax, restarts, "start_step")
    save(fig, ax, "loss.png", "loss by step", "step", "loss", "start_step")

    fig, ax = plt.subplots(figsize=SIZE_IN, dpi=DPI, layout="constrained")
    _gaps(ax, gaps)
    _plot_time(ax, by_time(train, "loss"), cuts, t0, color="tab:blue", linewidth=1, label="train loss")
    _plot_time(ax, by_time(evals, "val_loss"), cuts, t0, color="tab:green", marker="o", markersize=3,
               label="val loss")
    _markers(ax, restarts, "hours")
    save(fig, ax, "loss_time.png", "loss over wall-clock time", "hours since the first start", "loss", "hours")

    fig, ax = plt.subplots(figsize=SIZE_IN, dpi=DPI, layout="constrained")
    _gaps(ax, gaps)
    _plot_time(ax, by_time(train, "tokens_per_sec"), cuts, t0, color="tab:blue", linewidth=1,
               label="tokens/s, all ranks")
    _markers(ax, restarts, "hours")
    ax.set_ylim(bottom=0)
    save(fig, ax, "throughput.png", "throughput", "hours since the first start", "tokens per second", "hours")
    seconds = time.perf_counter() - started

    span_h = (max(times) - t0) / 3600 if times else 0.0
    best = min(zip(val_losses, val_steps, strict=True)) if val_steps else None
    report = {"run": facts["run"], "restarts": restarts, "gaps_hours": gaps, "marker_x_pixels": pixels,
              "final_train_loss": {"step": steps[-1], "loss": losses[-1]},
              "best_val_loss": {"step": best[1], "loss": best[0]} if best else None,
              "span_hours": span_h, "seconds": round(seconds, 3)}
    try:
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "summary.md").write_text(summary(facts, report, t0))
    except OSError as e:
        raise UserError(f"{out}: cannot write the summary ({e.strerror}); free some space or choose "
                        "another --out") from None
    return {**report, "written": [str(p) for p in [*written, out / "summary.md", out / "report.json"]]}


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def summary(facts: dict[str, Any], report: dict[str, Any], t0: float) -> str:
    exit_code = f" (exit {facts['exit_code']})" if facts["exit_code"] is not None else ""
    down_h = sum(b - a for a, b in report["gaps_hours"])
    final, best = report["final_train_loss"], report["best_val_loss"]
    lines = [f"# Run report: {facts['run']}", "",
             "| | |", "| --- | --- |",
             f"| run | {facts['run']} |",
             f"| experiment | {facts['experiment'] or '-'} |",
             f"| status | {facts['status']}{exit_code} |",
             f"| steps | {facts['step']} / {facts['target_step']} |",
             f"| restarts | {len(report['restarts'])} |",
             f"| wall clock | {age(report['span_hours'] * 3600)} from the first start ({_when(t0)}) to the "
             f"last metrics line, {age(down_h * 3600)} of it not running |",
             f"| final train loss | {final['loss']:.4f} at step {final['step']} |",
             f"| best val loss | {best['loss']:.4f} at step {best['step']} |" if best else "| best val loss | - |",
             ""]
    g = facts["goodput"]
    if g["wall"]:
        lines += ["## Goodput", "", f"{100 * g['goodput']:.1f} % of {age(g['wall'])} of wall-clock time over "
                  f"{g['starts']} start(s) went to steps that were kept ({age(g['down'])} down between starts).", "",
                  "| part | seconds | share |", "| --- | --- | --- |"]
        lines += [f"| {part} | {sec:.1f} | {100 * sec / g['wall']:.1f} % |" for part, sec in g["parts"].items()]
        lines.append("")
    if report["restarts"]:
        lines += ["## Restarts", "", "| # | at step | hours since first start | previous start ended | steps redone |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['restart']} | {r['start_step']} | {r['hours']:.3f} | {r['previous_end']} | "
                  f"{r['steps_redone']} |" for r in report["restarts"]]
        lines.append("")
    lines += ["## Figures", ""]
    lines += [f"![{name[:-4]}]({name})" for name in FIGURES]
    return "\n".join(lines) + "\n"


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run name")
    add_runs_root(p)
    p.add_argument("--out", help="folder to write into (default: <run dir>/report/)")


def run(args: argparse.Namespace) -> int:
    run_dir = RunDir(runs_root(args.runs_root) / args.run)
    result = build(run_dir, Path(args.out) if args.out else run_dir.path / "report", time.time())
    print("\n".join(result["written"]))
    return 0
