"""Watchdog and heartbeat: a stuck process dumps its stacks and exits 124; a live one never does."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from contextlib import suppress
from pathlib import Path

import psutil
import structlog
from helpers import REPO, Launch, losses, train_cmd

from prefix.watchdog import EXIT_HUNG, Watchdog, heartbeat_age, main, pid1_started, read_heartbeat

SCRIPT = """
import sys, threading, time
from pathlib import Path
from prefix.telemetry import setup_logging
from prefix.watchdog import Watchdog
logs, timeout, mode = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
dog = Watchdog(timeout, logs, 0, setup_logging(0, logs))
dog.start(0)
print(time.monotonic(), flush=True)  # armed at (the clock is shared by all processes)

def stuck_in_a_collective():
    threading.Event().wait()

if mode == "hang":
    stuck_in_a_collective()
for step in range(1, 16):  # 3 s of steps, each well inside the timeout
    time.sleep(0.2)
    dog.beat(step)
dog.stop()
time.sleep(2 * timeout)  # the final checkpoint and exit path: never fires once stopped
"""


def watched(tmp_path: Path, timeout: float, mode: str) -> tuple[subprocess.CompletedProcess, float]:
    """The script's result and the seconds from arming the watchdog to the script's exit."""
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(timeout), mode], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    return result, time.monotonic() - float(result.stdout.split()[0])


def test_a_stuck_process_dumps_its_stacks_and_exits(tmp_path):
    result, took = watched(tmp_path, 1.5, "hang")
    assert result.returncode == EXIT_HUNG, result.stderr
    assert 1.5 <= took < 1.5 + 3
    (stacks,) = tmp_path.glob("stacks_rank0_*.txt")
    assert "in stuck_in_a_collective" in stacks.read_text()
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: watchdog:")]
    assert len(errors) == 1, result.stderr
    assert "watchdog.timeout_s=1.5" in errors[0] and "after step 0" in errors[0] and str(stacks) in errors[0]
    events = [json.loads(line) for line in (tmp_path / "rank0.jsonl").read_text().splitlines()]
    assert [(e["level"], e["step"], e["stacks"]) for e in events if e["event"].startswith("watchdog: no progress")] \
        == [("error", 0, str(stacks))]


def test_steps_that_keep_coming_and_a_stop_never_fire(tmp_path):
    result, _ = watched(tmp_path, 1.0, "beat")
    assert result.returncode == 0, result.stderr
    assert not list(tmp_path.glob("stacks_*")) and "watchdog" not in result.stderr
    assert read_heartbeat(tmp_path)["step"] == 15


def test_timeout_0_starts_no_thread_but_still_writes_the_heartbeat(tmp_path):
    threads = threading.active_count()
    dog = Watchdog(0, tmp_path, 0, structlog.get_logger())
    dog.start(7)
    assert threading.active_count() == threads
    dog.stop()
    assert read_heartbeat(tmp_path)["step"] == 7 and 0 <= heartbeat_age(tmp_path) < 5
    assert read_heartbeat(tmp_path / "nothing") is None and heartbeat_age(tmp_path / "nothing") is None
    # the probe: a heartbeat from before this container's PID 1 started is a previous pod's
    (tmp_path / "heartbeat.json").write_text(json.dumps({"step": 3, "time": pid1_started() - 10, "pid": 1, "rank": 0}))
    assert main([str(tmp_path), "--max-age", "1e12"]) == 0
    assert main([str(tmp_path), "--max-age", "1e12", "--this-container"]) == 1


def test_the_heartbeat_is_whole_at_every_read_and_fresh_after_the_run(tmp_path):
    run_dir, beat = tmp_path / "r", tmp_path / "r" / "logs" / "heartbeat.json"
    launch = Launch(train_cmd(0, "r", tmp_path, "trainer.max_steps=30", "trainer.eval_every=0"), tmp_path / "log")
    steps, reads = set(), 0
    while launch.proc.poll() is None:
        with suppress(FileNotFoundError):  # only until the first one: it is replaced, never removed
            steps.add(json.loads(beat.read_text())["step"])  # a torn file would raise here
            reads += 1
        time.sleep(0.002)  # leave the trainer its cores
    assert launch.wait() == 0, launch.log.read_text()[-3000:]
    assert reads > 50 and len(steps) > 10, (reads, steps)
    final = read_heartbeat(run_dir)
    assert final == read_heartbeat(run_dir / "logs")
    assert final["step"] == 30 and final["rank"] == 0 and final["pid"] == launch.proc.pid
    assert 0 <= heartbeat_age(run_dir) < 30
    probe = [sys.executable, "-m", "prefix.watchdog", str(run_dir), "--max-age"]
    assert subprocess.run([*probe, "60"], cwd=REPO, capture_output=True).returncode == 0
    assert subprocess.run([*probe, "0"], cwd=REPO, capture_output=True).returncode == 1


def test_a_stuck_peer_under_torchrun_ends_the_launch_with_stacks(tmp_path):
    run_dir, timeout = tmp_path / "r", 5
    launch = Launch(train_cmd(2, "r", tmp_path, f"watchdog.timeout_s={timeout}", "trainer.max_steps=100000",
                              "checkpoint.every_steps=0", "trainer.eval_every=0"), tmp_path / "log")
    workers: dict[str, psutil.Process] = {}
    try:
        launch.wait_for_step(run_dir, 3)
        # torchrun's direct children are the ranks (DataLoader workers are their children, with the same
        # environment); torchrun gives each its RANK in the environment it was started with.
        children = [(p, p.environ()) for p in psutil.Process(launch.proc.pid).children()]
        workers = {env["RANK"]: p for p, env in children if "RANK" in env}
        assert sorted(workers) == ["0", "1"]
        workers["1"].suspend()  # alive but stuck: rank 0 waits in its next collective
        stopped, seen = time.monotonic(), max(losses(run_dir))
        workers["0"].wait(timeout + 15)  # rank 0's watchdog ends it (exit code checked below)
        assert time.monotonic() - stopped >= timeout - 1  # its last step may have ended just before
        (stacks,) = (run_dir / "logs").glob("stacks_rank0_*.txt")
        text = stacks.read_text()
        assert " in fit" in text and any(f" in {f}" in text for f in ("all_reduce", "backward")), text
        beat = read_heartbeat(run_dir)
        assert beat["step"] >= seen and beat["pid"] == workers["0"].pid
        assert heartbeat_age(run_dir) >= timeout - 1
        workers["1"].resume()  # else torchrun waits 30 s before its SIGKILL reaches a stopped process
        assert launch.proc.wait(30) != 0
        log = launch.log.read_text()
        assert f"exitcode  : {EXIT_HUNG}" in log and "error: watchdog: rank 0" in log, log[-3000:]
    finally:
        for p in workers.values():
            with suppress(psutil.Error):
                p.send_signal(signal.SIGCONT)
        launch.kill_all()
