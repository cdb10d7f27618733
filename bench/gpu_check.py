"""The Python half of bench/gpu_check.sh: read the run folders it leaves, and time a plain torch.save.

Each measuring subcommand writes one step's result, `{"figures": {...}, "checks": [...], "notes": [...]}`,
to a JSON file; `summary` merges them into the summary JSON and exits 1 when a check failed. A check is
`{"what", "passed", "detail"}`, `passed` None where the figure is reported rather than judged (bf16 +
torch.compile on CUDA may not be bitwise reproducible run to run, so a resume that differs from an
uninterrupted run only fails when two uninterrupted runs agree).

Only the standard library at import time; torch and prefix where a subcommand needs them.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written
    return records


def losses(run: Path) -> dict[int, float]:
    """Loss per step; a step redone after a restart keeps its last value (as tests/helpers.py)."""
    return {r["step"]: r["loss"] for r in read_jsonl(run / "metrics" / "train.jsonl")}


def check(what: str, passed: bool | None, detail: str = "") -> dict:
    return {"what": what, "passed": passed, "detail": detail}


def write(path: Path, figures: dict, checks: list[dict], notes: list[str] | None = None) -> None:
    path.write_text(json.dumps({"figures": figures, "checks": checks, "notes": notes or []}, indent=1) + "\n")


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# --- environment -------------------------------------------------------------------------------------------


def env(args: argparse.Namespace) -> None:
    figures: dict[str, object] = {"python": sys.version.split()[0], "platform": platform.platform(),
                                  "commit": _git("rev-parse", "HEAD"), "dirty": bool(_git("status", "--porcelain"))}
    notes: list[str] = []
    smi = Path(args.nvidia_smi)
    figures["nvidia_smi"] = smi.read_text() if smi.is_file() else "(not run)"
    try:
        import torch

        from prefix.model import peak_flops

        figures["torch"] = torch.__version__
        figures["cuda"] = torch.version.cuda
        figures["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        figures["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            device = torch.device("cuda", 0)
            figures["device_name"] = torch.cuda.get_device_name(device)
            figures["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
            figures["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
            figures["peak_bf16_flops"] = peak_flops(device)
            if figures["peak_bf16_flops"] is None:
                notes.append(f"{figures['device_name']} is not in prefix.model.PEAK_BF16_FLOPS: no mfu is logged")
        try:
            import triton

            figures["triton"] = triton.__version__
        except ImportError:
            figures["triton"] = None
    except Exception as e:  # noqa: BLE001 (reported, the preflight check fails)
        figures["torch"] = None
        notes.append(f"torch / prefix did not import: {type(e).__name__}: {e}")
    checks = []
    if args.want_cuda:
        checks.append(check("torch sees a CUDA GPU", bool(figures.get("cuda_available")),
                            str(figures.get("device_name", "none"))))
    write(Path(args.result), figures, checks, notes)


def _git(*argv: str) -> str | None:
    try:
        return subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001 (no git on the machine, or not a checkout)
        return None


# --- polling a run -----------------------------------------------------------------------------------------


def wait_step(args: argparse.Namespace) -> int:
    """Exit 0 once the run logged step `step`, 1 when the process is gone first or the time is up."""
    deadline = time.monotonic() + args.timeout
    train = Path(args.run) / "metrics" / "train.jsonl"
    while time.monotonic() < deadline:
        done = max(losses(Path(args.run)), default=0)
        if done >= args.step:
            print(f"{args.run}: step {done} logged", flush=True)
            return 0
        if args.pid and not Path(f"/proc/{args.pid}").exists():
            print(f"{args.run}: process {args.pid} exited before step {args.step} ({train})", flush=True)
            return 1
        time.sleep(0.02)
    print(f"{args.run}: step {args.step} not logged in {args.timeout} s", flush=True)
    return 1


# --- step 1: throughput ------------------------------------------------------------------------------------


def run_figures(run: Path, skip: int) -> dict[str, object]:
    """tokens/s, step time, MFU and data wait of one run, from its metrics/train.jsonl lines after step `skip`
    (the first window holds the compilation). Medians over the logged windows, and the sustained rate from the
    first kept line to the last (periodic saves included)."""
    records = read_jsonl(run / "metrics" / "train.jsonl")
    kept = [r for r in records if r["step"] > skip]
    figures: dict[str, object] = {"steps": max((r["step"] for r in records), default=0), "lines": len(kept)}
    if not kept:
        return figures
    figures["tokens_per_s"] = median([r["tokens_per_sec"] for r in kept])
    figures["step_time_s"] = median([r["step_time"] for r in kept])
    figures["data_wait_share"] = median([r["data_wait"] / r["step_time"] for r in kept if r["step_time"] > 0])
    mfu = [r["mfu"] for r in kept if "mfu" in r]
    figures["mfu"] = median(mfu)
    first, last = kept[0], kept[-1]
    if last["time"] > first["time"]:
        figures["sustained_tokens_per_s"] = (last["tokens_seen"] - first["tokens_seen"]) / (last["time"] - first["time"])
    if records:
        figures["first_window_s"] = records[0]["step_time"] * records[0]["step"]  # includes the compilation
        figures["final_loss"] = records[-1]["loss"]
    return figures


def throughput(args: argparse.Namespace) -> None:
    figures: dict[str, object] = {}
    checks, notes = [], []
    for label, run, code in zip(args.labels, args.runs, args.codes, strict=True):
        run = Path(run)
        figures[label] = run_figures(run, args.skip)
        figures[label]["exit_code"] = int(code)
        ok = int(code) == 0 and figures[label]["steps"] == args.max_steps and bool(figures[label].get("tokens_per_s"))
        checks.append(check(f"throughput {label}: exit 0, {args.max_steps} steps, tokens/s logged", ok,
                            f"exit {code}, {figures[label]['steps']} steps"))
        if args.want_mfu and figures[label].get("mfu") is None:
            notes.append(f"{label}: no mfu in metrics/train.jsonl (GPU peak not known to prefix.model?)")
    if len(args.labels) == 2:
        a, b = (figures[label].get("tokens_per_s") for label in args.labels)
        if a and b:
            figures[f"{args.labels[0]}_over_{args.labels[1]}"] = a / b
    write(Path(args.result), figures, checks, notes)


# --- step 2: SIGTERM, resume, bitwise ----------------------------------------------------------------------


def _weights(run: Path) -> dict:
    from prefix.state import TrainState

    return TrainState.load(run / "checkpoints" / "latest.pt").model


def _compare(a: Path, b: Path) -> dict[str, object]:
    """Per-step losses and final weights of two runs: equal bitwise or not, and how far apart."""
    import torch

    la, lb = losses(a), losses(b)
    common = sorted(la.keys() & lb.keys())
    out: dict[str, object] = {"losses_equal": bool(la) and la == lb, "steps_compared": len(common),
                              "max_loss_diff": max((abs(la[s] - lb[s]) for s in common), default=None)}
    first = next((s for s in common if la[s] != lb[s]), None)
    out["first_differing_step"] = first
    try:
        wa, wb = _weights(a), _weights(b)
    except Exception as e:  # noqa: BLE001 (a missing checkpoint is reported as such)
        out["weights_equal"], out["weights_error"] = None, f"{type(e).__name__}: {e}"
        return out
    same_keys = wa.keys() == wb.keys()
    out["weights_equal"] = same_keys and all(torch.equal(wa[k], wb[k]) for k in wa)
    if same_keys and not out["weights_equal"]:
        out["max_weight_diff"] = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    return out


def resume(args: argparse.Namespace) -> None:
    a, b, r = Path(args.a), Path(args.b), Path(args.r)
    figures: dict[str, object] = {"uninterrupted_exit_codes": [int(args.code_a), int(args.code_b)],
                                  "sigterm_exit_code": int(args.code_first), "resume_exit_code": int(args.code_second),
                                  "max_steps": args.max_steps, "signal_after_step": args.signal_at}
    checks, notes = [], []
    checks.append(check("uninterrupted runs exit 0", int(args.code_a) == 0 and int(args.code_b) == 0,
                        f"exit {args.code_a}, {args.code_b}"))
    checks.append(check("SIGTERM mid-run: exit 143", int(args.code_first) == 143, f"exit {args.code_first}"))
    starts = read_jsonl(r / "meta" / "starts.jsonl")
    stopped_at = starts[-1]["start_step"] if len(starts) > 1 else None
    figures["stopped_at_step"] = stopped_at
    figures["start_steps"] = [s.get("start_step") for s in starts]
    events = [e.get("event", "") for e in read_jsonl(r / "logs" / "rank0.jsonl")]
    checks.append(check("final checkpoint logged before the exit",
                        "stopped by signal after final checkpoint" in events))
    checks.append(check("signal landed mid-run", stopped_at is not None and 0 < stopped_at < args.max_steps,
                        f"stopped at {stopped_at} of {args.max_steps}"))
    checks.append(check("restart resumes that step and exits 0",
                        int(args.code_second) == 0 and f"resumed from step {stopped_at}" in events,
                        f"exit {args.code_second}, start steps {figures['start_steps']}"))
    determinism = _compare(a, b)
    resumed = _compare(a, r)
    figures["two_uninterrupted_runs"] = determinism
    figures["resumed_vs_uninterrupted"] = resumed
    deterministic = bool(determinism["losses_equal"] and determinism["weights_equal"])
    bitwise = bool(resumed["losses_equal"] and resumed["weights_equal"])
    figures["deterministic"], figures["resume_bitwise"] = deterministic, bitwise
    checks.append(check("two uninterrupted runs are bitwise identical (reported, not judged)", None,
                        "yes" if deterministic else f"no: {determinism}"))
    if deterministic:
        checks.append(check("resumed run bitwise equals the uninterrupted one", bitwise,
                            "yes" if bitwise else f"no: {resumed}"))
    else:
        checks.append(check("resumed run bitwise equals the uninterrupted one (not judged: the runs are not "
                            "deterministic)", None, "yes" if bitwise else f"no: {resumed}"))
        notes.append("two uninterrupted runs differ, so the resume is compared with run-to-run noise: max loss "
                     f"difference resumed {resumed['max_loss_diff']} vs uninterrupted {determinism['max_loss_diff']}")
    write(Path(args.result), figures, checks, notes)


# --- step 3: checkpoint stall ------------------------------------------------------------------------------


def plain_save(args: argparse.Namespace) -> None:
    """A bare loop's checkpoint on the same device (bench/common.py's plain_save: torch.save of the same GPT's
    and AdamW's state where training keeps it, with and without fsync) into `folder`, the runs' disk."""
    import common  # bench/ is this script's folder, so on sys.path

    figures = common.plain_save(Path(args.config), args.overrides, Path(args.folder), args.repeats, args.device)
    Path(args.result).write_text(json.dumps(figures) + "\n")


def stall(args: argparse.Namespace) -> None:
    figures: dict[str, object] = {}
    checks, notes = [], []
    for mode, run in (("async", Path(args.async_run)), ("sync", Path(args.sync_run))):
        saves = [s for s in read_jsonl(run / "metrics" / "checkpoint.jsonl")
                 if s.get("ok", True) and s["step"] < args.max_steps]  # the final save is synchronous by design
        figures[f"{mode}_saves"] = len(saves)
        figures[f"{mode}_stall_s"] = median([s["stall_s"] for s in saves])
        figures[f"{mode}_write_s"] = median([s.get("write_s", s["stall_s"]) for s in saves])
        flags = {s.get("async") for s in saves}
        checks.append(check(f"{mode} periodic saves logged in metrics/checkpoint.jsonl",
                            bool(saves) and flags == {mode == "async"}, f"{len(saves)} saves, async={sorted(map(str, flags))}"))
    plain_file = Path(args.plain)
    if plain_file.is_file():
        plain = json.loads(plain_file.read_text())
        figures["plain_save_s"] = median(plain["save_s"])
        figures["plain_save_fsync_s"] = median(plain["save_fsync_s"])
        figures["state_bytes"], figures["params"], figures["plain_device"] = plain["bytes"], plain["params"], plain["device"]
        checks.append(check("plain torch.save timed", True, f"{figures['plain_save_s']:.3f} s"))
    else:
        checks.append(check("plain torch.save timed", False, "no result (see the log)"))
    plain_s = figures.get("plain_save_s")
    for mode in ("async", "sync"):
        if plain_s and figures.get(f"{mode}_stall_s") is not None:
            figures[f"{mode}_stall_over_plain"] = figures[f"{mode}_stall_s"] / plain_s
    if figures.get("async_stall_over_plain") is not None:
        checks.append(check("async stall ÷ plain torch.save ≤ 0.1 (the CPU benchmark's goal; reported)", None,
                            f"{figures['async_stall_over_plain']:.3f}×"))
    notes.append(f"periodic saves from {args.async_run} (checkpoint.async=true) and {args.sync_run} "
                 "(checkpoint.async=false), the step-1 runs")
    write(Path(args.result), figures, checks, notes)


# --- step 4: FSDP ------------------------------------------------------------------------------------------


def has_key(args: argparse.Namespace) -> int:
    """Exit 0 when `prefix train --print-config`'s YAML (in a file) has the dotted key, else 1."""
    import yaml

    node: object = yaml.safe_load(Path(args.file).read_text())
    for part in args.key.split("."):
        if not isinstance(node, dict) or part not in node:
            return 1
        node = node[part]
    return 0


def fsdp(args: argparse.Namespace) -> None:
    if args.skipped:
        figures = {"status": "skipped", "reason": args.skipped}
        write(Path(args.result), figures, [check("fsdp on one GPU", None, args.skipped)])
        return
    figures = run_figures(Path(args.run), args.skip)
    figures["status"], figures["exit_code"] = "ran", int(args.code)
    ok = int(args.code) == 0 and figures["steps"] == args.max_steps
    write(Path(args.result), figures, [check("fsdp run: exit 0, tokens/s logged", ok and bool(figures.get("tokens_per_s")),
                                             f"exit {args.code}, {figures['steps']} steps")])


# --- summary -----------------------------------------------------------------------------------------------


def summary(args: argparse.Namespace) -> int:
    steps: dict[str, object] = {}
    for name in args.steps:
        path = Path(args.results) / f"{name}.json"
        steps[name] = json.loads(path.read_text()) if path.is_file() else {
            "figures": {}, "checks": [check(f"{name}: step did not finish", False)], "notes": []}
    checks = [c for step in steps.values() for c in step["checks"]]
    failed = [c for c in checks if c["passed"] is False]
    body = {"mode": args.mode, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "elapsed_s": args.elapsed, "ok": not failed, "failed": [c["what"] for c in failed],
            "steps": steps,
            "commands": Path(args.commands).read_text().splitlines() if args.commands and Path(args.commands).is_file() else []}
    Path(args.out).write_text(json.dumps(body, indent=1) + "\n")
    if args.final:
        print(f"\n== summary ({args.mode}, {args.elapsed} s): {args.out}")
        for c in checks:
            mark = {True: "pass", False: "FAIL", None: "info"}[c["passed"]]
            print(f"  {mark:4}  {c['what']}" + (f": {c['detail']}" if c["detail"] else ""))
        for name, step in steps.items():
            for note in step["notes"]:
                print(f"  note  {name}: {note}")
        _headline(steps)
    return 1 if failed else 0


def _headline(steps: dict) -> None:
    t = steps.get("throughput", {}).get("figures", {})
    for label in ("compile", "eager"):
        f = t.get(label, {})
        if f.get("tokens_per_s"):
            mfu = f.get("mfu")
            print(f"  {label}: {f['tokens_per_s']:,.0f} tokens/s" + (f", MFU {100 * mfu:.1f} %" if mfu else ""))
    s = steps.get("checkpoint_stall", {}).get("figures", {})
    if s.get("plain_save_s"):
        print(f"  checkpoint stall: async {s.get('async_stall_s')} s, sync {s.get('sync_stall_s')} s, "
              f"plain torch.save {s['plain_save_s']:.3f} s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("env")
    s.add_argument("result")
    s.add_argument("--nvidia-smi", required=True)
    s.add_argument("--want-cuda", action="store_true")
    s = sub.add_parser("wait-step")
    s.add_argument("run")
    s.add_argument("step", type=int)
    s.add_argument("--pid", type=int)
    s.add_argument("--timeout", type=float, default=300)
    s = sub.add_parser("throughput")
    s.add_argument("result")
    s.add_argument("--labels", nargs="+", required=True)
    s.add_argument("--runs", nargs="+", required=True)
    s.add_argument("--codes", nargs="+", required=True)
    s.add_argument("--max-steps", type=int, required=True)
    s.add_argument("--skip", type=int, required=True)
    s.add_argument("--want-mfu", action="store_true")
    s = sub.add_parser("resume")
    s.add_argument("result")
    for name in ("a", "b", "r", "code-a", "code-b", "code-first", "code-second"):
        s.add_argument(f"--{name}", required=True)
    s.add_argument("--max-steps", type=int, required=True)
    s.add_argument("--signal-at", type=int, required=True)
    s = sub.add_parser("plain-save")
    s.add_argument("result")
    s.add_argument("--config", required=True)
    s.add_argument("--device", required=True)
    s.add_argument("--folder", required=True)
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--overrides", nargs="*", default=[])
    s = sub.add_parser("stall")
    s.add_argument("result")
    s.add_argument("--async-run", required=True)
    s.add_argument("--sync-run", required=True)
    s.add_argument("--plain", required=True)
    s.add_argument("--max-steps", type=int, required=True)
    s = sub.add_parser("has-key")
    s.add_argument("file")
    s.add_argument("key")
    s = sub.add_parser("fsdp")
    s.add_argument("result")
    s.add_argument("--skipped")
    s.add_argument("--run")
    s.add_argument("--code", default="0")
    s.add_argument("--max-steps", type=int, default=0)
    s.add_argument("--skip", type=int, default=0)
    s = sub.add_parser("summary")
    s.add_argument("out")
    s.add_argument("--results", required=True)
    s.add_argument("--mode", required=True)
    s.add_argument("--elapsed", type=int, default=0)
    s.add_argument("--steps", nargs="+", required=True)
    s.add_argument("--commands", help="a file of the commands run, one a line")
    s.add_argument("--final", action="store_true")
    args = p.parse_args()
    handler = {"env": env, "wait-step": wait_step, "throughput": throughput, "resume": resume,
               "plain-save": plain_save, "stall": stall, "has-key": has_key, "fsdp": fsdp, "summary": summary}
    return handler[args.cmd](args) or 0


if __name__ == "__main__":
    sys.exit(main())
