"""Shared by the benchmarks: real training launches, what they leave behind, timing and result files.

Every benchmark prints its figures and at least one ratio of two measurements taken side by side in
the same run, and writes them to `bench/results/<name>.json` (`--out` elsewhere):

    {"benchmark", "quick", "date", "setup", "figures": {key: number}, "checks": [check, ...], "notes": [...]}

where a check is {"what", "value", "unit", "goal", "passed"} (`passed` None when there is no goal).
`bench/run_all.py` renders every result file into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # this checkout's prefix package, in this process and (PYTHONPATH) its children
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
os.environ.setdefault("PREFIX_CACHE_DIR", str(REPO / ".cache" / "prefix"))  # what `make` sets

from prefix.tools import processes  # noqa: E402  (needs the path above)
from prefix.tools.processes import Launch, Tail  # noqa: E402

CONFIGS = REPO / "configs"
TINY, DEMO, GPT2 = CONFIGS / "tiny.yaml", CONFIGS / "demo.yaml", CONFIGS / "gpt2-124m.yaml"
RESULTS = REPO / "bench" / "results"
QUIET = ("trainer.sample_tokens=0", "telemetry.progress=never", "trainer.device=cpu")
MEDIUM = ("model.n_layer=6", "model.d_model=512", "model.n_head=8", "trainer.global_batch_size=2",
          "trainer.micro_batch_size=1", "trainer.eval_every=0")
"""configs/demo.yaml widened to 19.4M parameters: model + AdamW state = 233 MB, a save that takes time."""


def model_name(config: Path, medium: Sequence[str], detail: str = "") -> str:
    """How a setup line names the model: the config, and whether MEDIUM widened it."""
    return f"{config.name}{' widened to 6 layers × 512' + detail if medium else ''}"


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny config, one repetition: seconds, for the tests")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"folder for <name>.json (default {RESULTS})")
    return p


def runs_folder() -> tempfile.TemporaryDirectory:
    """Run directories and plain saves of one benchmark: same disk as a run's ($TMPDIR), removed afterwards."""
    return tempfile.TemporaryDirectory(prefix="prefix-bench-")


def train_cmd(nproc: int, run_name: str, runs_root: Path, *overrides: str, config: Path = TINY) -> list[str]:
    """The tests' and the chaos harness's training command, quiet and on the CPU."""
    return processes.train_cmd(nproc, run_name, runs_root, config, *QUIET, *overrides)


class Noise:
    """The CPU other processes used while a benchmark ran, as a share of all cores: the machine's busy time
    minus this process's and its (waited-for) children's. On a shared machine, figures taken while others
    were busy are unreliable; `settle` waits for a quiet moment before each measured launch."""

    def __init__(self, wait: bool = True) -> None:
        self.wait, self.waited = wait, 0.0  # quick modes (the tests) do not wait
        self.begin = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        import psutil

        t, own = psutil.cpu_times(), os.times()
        busy = t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + getattr(t, "steal", 0)
        return time.monotonic(), busy, own.user + own.system + own.children_user + own.children_system

    def share(self) -> float:
        (t0, busy0, mine0), (t1, busy1, mine1) = self.begin, self._sample()
        return max(0.0, (busy1 - busy0) - (mine1 - mine0)) / max((t1 - t0) * (os.cpu_count() or 1), 1e-9)

    def settle(self, busy_below: float = 0.25, max_wait: float = 60.0, budget: float = 180.0) -> None:
        """Wait (at most `max_wait` s, `budget` s in all) until the CPU use is under `busy_below` of all cores."""
        import psutil

        if not self.wait:
            return
        begin, limit = time.monotonic(), min(max_wait, budget - self.waited)
        while psutil.cpu_percent(interval=0.5) / 100 > busy_below and time.monotonic() - begin < limit:
            pass
        self.waited += time.monotonic() - begin

    def report(self, figures: dict[str, object], notes: list[str]) -> None:
        share = self.share()
        figures["other_processes_cpu_share"] = share
        if share > 0.05:
            notes.append(f"other processes used {100 * share:.0f} % of the CPU while this ran (waited "
                         f"{self.waited:.0f} s for quiet moments): its figures are less reliable")


def start(cmd: list[str], run_dir: Path) -> tuple[Launch, float]:
    """A launch in its own session (prefix.tools.processes.Launch) and the wall-clock time just before it."""
    launched = time.time()
    return Launch(cmd, run_dir), launched


def finish(launch: Launch, timeout: float = 600, codes: Sequence[int] = (0,)) -> int:
    """Wait for the launch; its log's tail in the error when it hangs or exits with an unexpected code."""
    try:
        code = launch.proc.wait(timeout)
    except Exception:
        launch.kill()
        raise RuntimeError(f"{launch.log} did not finish in {timeout}s:\n{tail(launch.log)}") from None
    if code not in codes:
        raise RuntimeError(f"exit code {code} (expected {list(codes)}); {launch.log}:\n{tail(launch.log)}")
    return code


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else "(no log)"


def read_jsonl(path: Path) -> list[dict]:
    return Tail(path, from_start=True).read()


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def events(run_dir: Path, name: str | None = None, since: float = 0.0, rank: int = 0) -> list[dict]:
    """Log records of logs/rank{r}.jsonl (event `name`, at or after wall-clock `since`), with `t` in epoch seconds."""
    found = []
    for record in read_jsonl(run_dir / "logs" / f"rank{rank}.jsonl"):
        record["t"] = _epoch(record["timestamp"])
        if (name is None or record.get("event") == name) and record["t"] >= since:
            found.append(record)
    return found


def checkpoint_saves(run_dir: Path) -> list[dict]:
    """One record per save: metrics/checkpoint.jsonl ({step, stall_s, write_s, bytes, async}); where a daemon
    does not write that file, its "checkpoint saved" log lines ({step, seconds}) as synchronous saves."""
    if (run_dir / "metrics" / "checkpoint.jsonl").exists():
        return [r for r in read_jsonl(run_dir / "metrics" / "checkpoint.jsonl") if r.get("ok", True)]
    return [{"step": e["step"], "stall_s": e["seconds"], "write_s": e["seconds"], "async": False}
            for e in events(run_dir, "checkpoint saved") if "seconds" in e]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def plain_save(config: Path, overrides: Sequence[str], folder: Path, repeats: int,
               device: str = "cpu") -> dict[str, object]:
    """A bare loop's checkpoint: torch.save of {model, optimizer} state dicts of the same GPT and AdamW (one
    update made, so the moments exist) to `folder`; seconds per save, without and with an fsync after it, and
    of one SHA-256 of the file's bytes. On `device` the tensors stay where training keeps them (fused AdamW
    on CUDA), so a GPU save includes its copy to the host."""
    import torch

    from prefix import config as configuration
    from prefix.model import GPT

    cfg = configuration.load(config, [*overrides])
    model = GPT(cfg.model).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.trainer.lr, fused=True if device == "cuda" else None)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    if device == "cuda":
        torch.cuda.synchronize()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    path, save_s, fsync_s = folder / "plain.pt", [], []
    for _ in range(repeats):
        path.unlink(missing_ok=True)
        begin = time.perf_counter()
        torch.save(state, path)
        saved = time.perf_counter()
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        save_s.append(saved - begin)
        fsync_s.append(time.perf_counter() - begin)
    size, data = path.stat().st_size, path.read_bytes()
    path.unlink()
    begin = time.perf_counter()
    hashlib.sha256(data).hexdigest()  # what the daemon adds to every file it writes (its manifest's checksum)
    return {"save_s": save_s, "save_fsync_s": fsync_s, "sha256_s": time.perf_counter() - begin, "bytes": size,
            "device": device,
            "params": model.num_params()}


def check(what: str, value: float | None, unit: str = "×", at_most: float | None = None,
          at_least: float | None = None) -> dict[str, object]:
    """One measured figure against its goal; value None when it could not be measured (passed: None)."""
    goal, passed = "—", None
    if at_most is not None:
        goal = f"≤ {at_most:g}{' ' + unit if unit != '×' else '×'}"
        passed = None if value is None else value <= at_most
    if at_least is not None:
        goal = f"≥ {at_least:g}{' ' + unit if unit != '×' else '×'}"
        passed = None if value is None else value >= at_least
    return {"what": what, "value": value, "unit": unit, "goal": goal, "passed": passed}


def verdict(c: dict[str, object]) -> str:
    return {True: "pass", False: "MISS", None: "n/a" if c["goal"] != "—" else ""}[c["passed"]]


def write_results(out: Path, name: str, quick: bool, setup: str, figures: dict[str, object],
                  checks: list[dict[str, object]], notes: list[str] | None = None, noise: Noise | None = None) -> Path:
    """Print the checks and write `<out>/<name>.json` (with `noise`'s share of other processes' CPU use)."""
    notes = [] if notes is None else notes
    if noise is not None:
        noise.report(figures, notes)
    for c in checks:
        shown = "not measured" if c["value"] is None else f"{c['value']:.3g}{c['unit'] if c['unit'] == '×' else ' ' + c['unit']}"
        print(f"  {c['what']}: {shown}" + (f" (goal {c['goal']}) {verdict(c)}" if c["goal"] != "—" else ""))
    for note in notes:
        print(f"  note: {note}")
    out.mkdir(parents=True, exist_ok=True)
    body = {"benchmark": name, "quick": quick, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "setup": setup, "figures": figures, "checks": checks, "notes": list(notes)}
    path = out / f"{name}.json"
    path.write_text(json.dumps(body, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {path}")
    return path
