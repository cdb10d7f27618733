"""`prefix launch`: real torchrun, real workers and signals; its exit code is what the workers recorded.

The workers are tiny scripts (a torchrun start costs seconds here, training would cost more), except
for the bad config, which goes through the Job's own container command as `prefix simulate` runs it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import TINY, assert_clean_exit_2, run

from prefix.tools import schedule, simulate
from prefix.tools.launch import outcome
from prefix.tools.processes import ProcessTree, train_cmd

LAUNCH = [sys.executable, "-m", "prefix.cli", "launch", "--standalone", "--nproc-per-node=2"]
WORKER = """\
import os, signal, subprocess, sys, time
from pathlib import Path
from prefix.errors import record_exit

mode, out, rank = sys.argv[1], Path(sys.argv[2]), int(os.environ["RANK"])
if mode == "fenced" and rank == 1:  # another start took the run over
    record_exit(3)
    sys.exit(3)
if mode == "crash" and rank == 1:  # killed without a word, as by the OOM killer
    os.kill(os.getpid(), signal.SIGKILL)
if mode == "sigterm":
    def stop(signum, frame):
        (out / f"got{signum}_rank{rank}").touch()
        record_exit(143)
        os._exit(143)
    signal.signal(signal.SIGTERM, stop)
    (out / f"ready{rank}").touch()
    time.sleep(120)
if mode == "orphan" and rank == 0:  # a grandchild whose parent is gone: PID 1 must reap it
    orphan = int(subprocess.run(["sh", "-c", "sleep 0.5 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True).stdout)
    parents, deadline = set(), time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{orphan}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            break  # reaped
        parents.add(int(stat[1]))
        time.sleep(0.05)
    (out / "orphan").write_text(f"{'zombie' if Path(f'/proc/{orphan}').exists() else 'reaped'} {sorted(parents)}")
"""


@pytest.fixture
def worker(tmp_path: Path) -> Path:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return script


@pytest.mark.parametrize("torchrun,recorded,code", [
    (0, {}, 0),
    (1, {0: 2, 1: 3}, 2),           # a user error wins: a retry would fail again
    (1, {0: 3, 1: 124}, 3),
    (1, {0: 124, 1: 143}, 124),
    (1, {0: 143, 1: 143}, 143),
    (1, {1: 143}, 143),             # this node's one rank stopped with its peers (another node preempted)
    (1, {0: 143, 1: 1}, 1),         # any other code during the stop is a crash
    (1, {}, 1),
    (2, {}, 2),                     # torchrun's own usage error
    (-9, {}, 137),                  # torchrun SIGKILLed: 128 + 9, as a shell says
])
def test_outcome_table(torchrun, recorded, code):
    assert outcome(torchrun, recorded)[0] == code


def test_no_arguments_is_a_usage_error():
    assert_clean_exit_2(run(LAUNCH[:4]), "give torchrun's arguments")


def test_a_usage_error_of_prefix_train_is_2(tmp_path):
    """argparse exits through `prefix.cli.Parser.error`, not the normal return, and records 2 there too."""
    cmd = train_cmd(2, "r", tmp_path, TINY, "--no-such-flag", launcher=True)
    assert cmd[:6] == [*LAUNCH[:4], "--standalone", "--nproc-per-node=2"]
    result = run(cmd, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("prefix launch: ")]
    assert line.startswith("prefix launch: exit 2: rank") and "a problem the user can fix" in line, line


@pytest.mark.parametrize("mode,code", [("fenced", 3), ("crash", 1)])
def test_a_worker_exit_becomes_the_launcher_exit(worker, tmp_path, mode, code):
    result = run([*LAUNCH, str(worker), mode, str(tmp_path)], timeout=120)
    assert result.returncode == code, result.stderr[-3000:]
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("prefix launch: ")]
    assert line.startswith(f"prefix launch: exit {code}: "), line


def test_sigterm_reaches_the_workers_and_their_143_is_the_exit(worker, tmp_path):
    log = tmp_path / "log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*LAUNCH, str(worker), "sigterm", str(tmp_path)], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready{r}").exists() for r in (0, 1)):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 143, log.read_text()[-3000:]
    finally:
        ProcessTree(proc.pid).kill()
    term = int(signal.SIGTERM)
    assert sorted(p.name for p in tmp_path.glob("got*")) == [f"got{term}_rank0", f"got{term}_rank1"]
    assert "prefix launch: exit 143 (after SIGTERM): ranks 0, 1 stopped by a signal" in log.read_text()


def pid_namespace() -> list[str] | None:
    """`unshare` arguments that run a command as PID 1 of a new PID namespace, as in a container, or None."""
    for prefix in (["unshare", "--pid", "--fork", "--mount-proc"],
                   ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc"]):
        try:
            if subprocess.run([*prefix, "sh", "-c", "test $$ = 1"], capture_output=True, timeout=30).returncode == 0:
                return prefix
        except (OSError, subprocess.TimeoutExpired):
            continue
    return None


def test_as_pid_1_it_reaps_orphans(worker, tmp_path):
    unshare = pid_namespace()
    if unshare is None:
        pytest.skip("no PID namespace here (unshare --pid needs root or user namespaces)")
    result = run([*unshare, *LAUNCH, str(worker), "orphan", str(tmp_path)], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    state, parents = (tmp_path / "orphan").read_text().split(" ", 1)
    assert "1" in parents.strip("[]").split(", "), f"the orphan was never the launcher's: {parents}"
    assert state == "reaped"


def test_the_job_command_exits_2_on_a_bad_config_and_the_job_fails(tmp_path):
    """The rendered Job's own container command, run here as `prefix simulate` runs it."""
    args = ["--config", str(TINY), "trainer.device=cpu", "trainer.no_such_key=1"]
    pod = simulate.from_manifest("bad", args)
    with simulate.Cluster(tmp_path, "job", args).start(pod, "bad", tmp_path / "cache") as launch:
        assert schedule.wait_exit(launch, 120), launch.log.read_text()[-3000:]
    assert launch.proc.returncode == 2, launch.log.read_text()[-3000:]
    assert 2 in pod.fail_job, "the Job's podFailurePolicy must fail it: a retry would fail the same way"
    assert "prefix launch: exit 2: rank" in launch.log.read_text()
