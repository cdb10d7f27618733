"""Process, host, GPU and network usage, sampled by a background thread into `metrics/`.

Why a thread: the step loop must not pay for it nor wait on it. A sample costs 1-3 ms of CPU
(docs/metrics.md), holds the GIL only in short stretches, and touches no RNG, so it cannot change
what is trained. Each part of a sample is guarded on its own: a part that fails is
logged once and left out of the line, the others go on, and nothing escapes the thread. Lines go
through an Appender (prefix.appender): a full volume delays or drops them.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import structlog
import torch

from prefix.appender import Appender, log_report

Scalars = Callable[[str, int, dict[str, float]], None]  # (prefix, step, values), e.g. Metrics.scalars


class SystemSampler:
    """Every `interval_s`: one line in `system.jsonl` and one in `network.jsonl` (rank r > 0:
    `system_rank{r}.jsonl`, `network_rank{r}.jsonl`) in `folder`, appended across restarts.

    `step_fn` returns the trainer's step, so lines join with train.jsonl; `scalars` (given a step)
    also receives the values, as `system/<name>` and `network/<name>`. Interval 0: start() does nothing.
    `before_write` (also `sink.before_write`) is called before every append; what it raises in the
    sampler's thread is logged once (part `write`) and the line is not written.
    """

    def __init__(self, folder: Path, interval_s: float, rank: int, device: torch.device, disk_path: Path,
                 *, step_fn: Callable[[], int] | None = None, log: Any = None, scalars: Scalars | None = None,
                 before_write: Callable[[], None] | None = None):
        self.folder, self.interval_s, self.rank = folder, interval_s, rank
        self.device, self.disk_path = device, disk_path
        self.step_fn, self.scalars = step_fn, scalars
        self.log = log if log is not None else structlog.get_logger()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sink = Appender("system metrics", log_report(self.log), before_write=before_write)
        self._files: dict[str, str] = {}  # kind → file, while started
        self._failed: set[str] = set()  # parts already logged as failing: logged once
        self._process = psutil.Process()
        self._children: dict[psutil.Process, psutil.Process] = {}  # kept: cpu_percent needs the last call
        self._net: tuple[float, int, int] | None = None  # monotonic time, bytes sent, bytes received
        self._gpu_util = device.type == "cuda"  # dropped silently at the first failure (needs pynvml)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> SystemSampler:
        if self.interval_s <= 0 or self._thread is not None:
            return self
        self._stop.clear()
        suffix = "" if self.rank == 0 else f"_rank{self.rank}"
        self._files = {kind: f"{self.folder}/{kind}{suffix}.jsonl" for kind in ("system", "network")}
        self._thread = threading.Thread(target=self._run, name="prefix-system-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Returns within one sample's time (the thread waits on an Event, not in a sleep)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._files.clear()
        self.sink.close()

    def __enter__(self) -> SystemSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- sampling -------------------------------------------------------------------------
    def _run(self) -> None:
        # First calls only set baselines; in this thread, as psutil keeps the host CPU's per thread.
        for part, fn in (("process", self._process_usage), ("host", self._host), ("network", self._network)):
            self._guard(part, fn)
        while not self._stop.wait(self.interval_s):
            self._guard("sample", self.sample_once)

    def sample_once(self) -> None:
        """One line per file (and the scalars); called by the thread, callable directly to measure it."""
        step = self._guard("step", self.step_fn) if self.step_fn is not None else None
        head = {"time": time.time()} if step is None else {"step": step, "time": time.time()}
        system: dict[str, float] = {}
        for part, fn in (("process", self._process_usage), ("host", self._host), ("disk", self._disk),
                         ("load", self._load), ("cuda", self._cuda)):
            system.update(self._guard(part, fn) or {})
        network = self._guard("network", self._network) or {}
        for kind, values in (("system", system), ("network", network)):
            file = self._files.get(kind)
            if values and file is not None:
                self._guard("write", self.sink.append, file, json.dumps({**head, **values}))
            if values and self.scalars is not None and step is not None:
                self._guard("tensorboard", self.scalars, kind, step, values)

    def _guard(self, part: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as e:  # never into the training process: log the first failure, go on
            if part not in self._failed:
                self._failed.add(part)
                self.log.warning("system metrics: a part failed; left out while it fails (logged once)",
                                 part=part, error=f"{type(e).__name__}: {e}")
            return None

    def _process_usage(self) -> dict[str, float]:
        """This process, and its descendants (DataLoader workers) summed apart; percent of one core."""
        values = {"cpu_percent": self._process.cpu_percent(None), "rss_bytes": self._process.memory_info().rss}
        cpu, rss, alive = 0.0, 0, {}
        for child in self._process.children(recursive=True):
            child = self._children.get(child, child)  # equal by (pid, create time): a reused pid is new
            try:
                cpu, rss = cpu + child.cpu_percent(None), rss + child.memory_info().rss
                alive[child] = child
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        self._children = alive
        return {**values, "children": len(alive), "children_cpu_percent": cpu, "children_rss_bytes": rss}

    def _host(self) -> dict[str, float]:
        mem = psutil.virtual_memory()
        return {"host_cpu_percent": psutil.cpu_percent(None), "mem_used_bytes": mem.used,
                "mem_available_bytes": mem.available, "mem_percent": mem.percent}

    def _disk(self) -> dict[str, float]:
        return {"disk_free_bytes": psutil.disk_usage(str(self.disk_path)).free}

    def _load(self) -> dict[str, float]:
        one, five, fifteen = os.getloadavg()
        return {"load_1m": one, "load_5m": five, "load_15m": fifteen}

    def _cuda(self) -> dict[str, float]:
        if self.device.type != "cuda":
            return {}
        values = {"cuda_allocated_bytes": torch.cuda.memory_allocated(self.device),
                  "cuda_reserved_bytes": torch.cuda.memory_reserved(self.device),
                  "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(self.device)}
        if self._gpu_util:
            try:
                values["gpu_util_percent"] = torch.cuda.utilization(self.device)
            except Exception:  # no pynvml / NVML: utilisation is optional, so no warning either
                self._gpu_util = False
        return values

    def _network(self) -> dict[str, float]:
        """Host-wide bytes per second over the last interval, all interfaces (loopback included)."""
        io, now = psutil.net_io_counters(), time.monotonic()
        last, self._net = self._net, (now, io.bytes_sent, io.bytes_recv)
        if last is None:
            return {}
        elapsed = max(now - last[0], 1e-9)
        return {"sent_bytes_per_s": max(0, io.bytes_sent - last[1]) / elapsed,
                "recv_bytes_per_s": max(0, io.bytes_recv - last[2]) / elapsed}
