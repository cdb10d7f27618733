"""Multi-node for real on one machine: two torchrun agents (one per "node"), c10d rendezvous on loopback.

Each agent runs in a session of its own, as one pod per node does, with a private /dev/shm and
$TMPDIR: pods do not share them, and MosaicML streaming's local leaders (local rank 0 on each
node) would otherwise race for the same shared-memory prefix. One node is preempted (SIGTERM,
then SIGKILL after a grace period) or dies at once (SIGKILL of its whole process tree); the other
must fail within a bounded time, and starting both again must finish the run bitwise as if it had
never stopped.
"""

from __future__ import annotations

import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import TINY, Launch, assert_same_weights, checkpoint, isolation_prefix, losses, read_jsonl

from prefix.tools.processes import ProcessTree

STEPS = 40  # tiny's defaults: 40 steps, a checkpoint every 10
GRACE_S = 30  # Kubernetes' default terminationGracePeriodSeconds
SURVIVOR_BOUND_S = 120  # generous: measured ~2 s on loopback (gloo sees the closed connection)


ISOLATE = isolation_prefix()
pytestmark = pytest.mark.skipif(ISOLATE is None, reason="needs unshare with a mount namespace "
                                "(a private /dev/shm per node, as each pod has)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_cmd(node: int, port: int, root: Path, *overrides: str, launcher: bool = False) -> list[str]:
    """One node's torchrun agent, as the multi-node manifest runs it, with the node's own /dev/shm and /tmp."""
    tmp = root / f"node{node}-tmp"
    tmp.mkdir(exist_ok=True)
    runner = ["prefix.cli", "launch"] if launcher else ["torch.distributed.run"]  # launch: as the pods run it
    agent = [sys.executable, "-m", *runner, "--nnodes=2", "--nproc-per-node=1",
             "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=multinode",
             "--max-restarts=0", "-m", "prefix.train", "--config", str(TINY), "--run-name", "r",
             "--runs-root", str(root), *overrides]
    assert ISOLATE is not None
    # exec: the agent keeps the pid Popen returned, so signals reach it as they reach a pod's PID 1
    return [*ISOLATE, "sh", "-c",
            f"mount -t tmpfs tmpfs /dev/shm && TMPDIR={shlex.quote(str(tmp))} exec {shlex.join(agent)}"]


class Cluster:
    """Two nodes of one run; every process either spawned is killed when the test ends."""

    def __init__(self, root: Path, *overrides: str, launcher: bool = False):
        self.root, self.run_dir, self.starts, self.overrides = root, root / "r", 0, overrides
        self.launcher = launcher
        self.nodes: list[Launch] = []
        self.trees: list[ProcessTree] = []

    def start(self) -> list[Launch]:
        port, self.starts = free_port(), self.starts + 1
        self.nodes = [Launch(node_cmd(n, port, self.root, *self.overrides, launcher=self.launcher), self.root / f"start{self.starts}-node{n}.log")
                      for n in range(2)]
        self.trees += [ProcessTree(node.proc.pid) for node in self.nodes]
        return self.nodes

    def wait_for_step(self, step: int, timeout: float = 180) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for tree in self.trees:
                tree.refresh()  # learn the workers while they live, for the final cleanup
            done = max(losses(self.run_dir), default=0)
            if done >= step:
                return done
            for node in self.nodes:
                assert node.proc.poll() is None, f"exited early:\n{node.log.read_text()[-3000:]}"
            time.sleep(0.05)
        raise AssertionError(f"step {step} not reached; log:\n{self.nodes[0].log.read_text()[-3000:]}")

    def finish(self) -> None:
        """Start both nodes again; the run must finish."""
        for node in self.start():
            assert node.wait() == 0, node.log.read_text()[-3000:]

    def cleanup(self) -> None:
        for tree in self.trees:
            tree.kill()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    c.cleanup()


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    """The same 2-node run, never interrupted."""
    c = Cluster(tmp_path_factory.mktemp("baseline"))
    try:
        c.finish()
    finally:
        c.cleanup()
    return c.run_dir


def assert_finished_like(run_dir: Path, baseline: Path) -> None:
    assert losses(run_dir) == losses(baseline)
    assert checkpoint(run_dir).step == STEPS
    assert_same_weights(checkpoint(run_dir).model, checkpoint(baseline).model)


def survivor_exit(survivor: Launch, since: float) -> tuple[int, float]:
    try:
        rc = survivor.proc.wait(SURVIVOR_BOUND_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the surviving node still runs {SURVIVOR_BOUND_S}s after the other went; "
                             f"log:\n{survivor.log.read_text()[-3000:]}") from None
    return rc, time.monotonic() - since


def test_preempted_node_stops_both_and_restart_is_bitwise(cluster: Cluster, baseline: Path) -> None:
    victim, survivor = cluster.start()  # victim: the node whose agent hosts the rendezvous endpoint
    cluster.wait_for_step(random.randint(12, 28))
    t0 = time.monotonic()
    victim.sigterm()  # pod deletion: SIGTERM to PID 1, SIGKILL of everything after the grace period
    try:
        victim_rc = victim.proc.wait(GRACE_S)
    except subprocess.TimeoutExpired:
        victim.kill_all()
        raise AssertionError(f"the preempted node outlived its grace period:\n{victim.log.read_text()[-3000:]}") \
            from None
    survivor_rc, seconds = survivor_exit(survivor, t0)
    print(f"SIGTERM: preempted agent exited {victim_rc}, surviving agent exited {survivor_rc} "
          f"{seconds:.1f}s after the signal")
    assert victim_rc != 0 and survivor_rc != 0
    assert "exitcode  : 143" in survivor.log.read_text(), "the survivor's worker stopped as preempted"

    stopped_at = max(losses(cluster.run_dir))
    assert stopped_at < STEPS, "the signal must land before the end for this test to mean anything"
    assert checkpoint(cluster.run_dir).step == stopped_at, "both ranks agreed and saved the last step"
    for rank in (0, 1):
        events = [e["event"] for e in read_jsonl(cluster.run_dir / "logs" / f"rank{rank}.jsonl")]
        assert "stopped by signal after final checkpoint" in events, f"rank {rank}"

    cluster.finish()
    starts = read_jsonl(cluster.run_dir / "meta" / "starts.jsonl")
    assert [s["start_step"] for s in starts] == [0, stopped_at]
    assert_finished_like(cluster.run_dir, baseline)


@pytest.mark.parametrize("dead", [0, 1], ids=["rendezvous-host-dies", "other-node-dies"])
def test_killed_node_fails_the_other_and_restart_is_bitwise(cluster: Cluster, baseline: Path, dead: int) -> None:
    nodes = cluster.start()
    victim, survivor = nodes[dead], nodes[1 - dead]
    cluster.wait_for_step(random.randint(12, 28))
    t0 = time.monotonic()
    victim.kill_all()  # the node is gone: every process at once, no signal to handle
    killed_at = max(losses(cluster.run_dir))
    survivor_rc, seconds = survivor_exit(survivor, t0)
    print(f"SIGKILL of node {dead}: surviving agent exited {survivor_rc} {seconds:.1f}s after the kill")
    assert survivor_rc != 0
    saved = checkpoint(cluster.run_dir).step
    assert saved <= killed_at < STEPS

    cluster.finish()
    starts = read_jsonl(cluster.run_dir / "meta" / "starts.jsonl")
    assert [s["start_step"] for s in starts] == [0, saved]
    assert killed_at - saved <= 10, "redo at most one checkpoint interval"
    assert_finished_like(cluster.run_dir, baseline)


COLLECTIVE_TIMEOUT_S = 20  # distributed.timeout_s in the test (at least 2 × run.lease_timeout_s + 10)


def test_a_frozen_node_ends_the_survivor_within_the_collective_timeout(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, f"distributed.timeout_s={COLLECTIVE_TIMEOUT_S}", "run.lease_timeout_s=5",
                      "trainer.max_steps=2000", launcher=True)
    try:
        survivor, frozen = cluster.start()
        cluster.wait_for_step(5)
        stopped = ProcessTree(frozen.proc.pid)
        t0 = time.monotonic()
        for p in stopped.procs.values():  # a frozen or partitioned node: its agent and worker stop answering
            p.send_signal(signal.SIGSTOP)
        survivor_rc, seconds = survivor_exit(survivor, t0)
        print(f"frozen node 1: surviving agent exited {survivor_rc} {seconds:.1f}s after the freeze")
        assert seconds <= COLLECTIVE_TIMEOUT_S + 60, "bounded by distributed.timeout_s, not the 600 s default"
        out = survivor.log.read_text()
        assert survivor_rc == 124, out[-3000:]  # the hang's code (prefix launch), which the Job retries
        lines = [line for line in out.splitlines() if line.startswith("error: rank") and "a peer did not answer" in line]
        assert len(lines) == 1 and f"distributed.timeout_s={COLLECTIVE_TIMEOUT_S}" in lines[0], out[-3000:]
        assert out.count("Traceback") <= out.count("ChildFailedError:"), "no traceback but torchrun's own summary"
    finally:
        cluster.cleanup()
