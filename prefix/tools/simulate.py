"""Pod-lifecycle simulator: run the container command a manifest or the Run:ai script builds, here.

`prefix simulate --preemptions 3` takes the command exactly as `k8s/job.yaml` (rendered by
`k8s/render.py`) or `runai/submit_train.sh --dry-run` builds it, runs it locally with its
environment (CPU, gloo; the PVC is a local folder) and plays the cluster until the run exits 0:
at a random moment after training started, SIGTERM to the PID-1 process (the `bash -c 'exec
prefix launch …'`), the manifest's grace period, SIGKILL of whatever is left; then a reschedule, one of
- `same-node`: the same command again (a pod restarted on the node it ran on);
- `new-node`: the same command with an empty local cache (the default corpus is rebuilt);
- `resubmit`: the command rebuilt by the Run:ai script's dry-run, as a user resubmitting the name.
It reports preemptions, flushes that finished inside the grace period and the pod's exit code for
each (a flushed one must exit 143, which the Job's podFailurePolicy does not fail on), steps redone,
the run's goodput from its ledger (metrics/time.jsonl), and whether the final weights and per-step
losses equal the same command run without interruption.

`--preempt-every S [--kind term|kill|mix] [--jitter J]` preempts on a schedule instead, until the run
completes (prefix/tools/schedule.py; the pod is restarted on the same node each time), and sets the
measured goodput beside the one the Young–Daly model predicts from the run's own save and restart
costs. `--no-compare` skips the uninterrupted run, for long schedules.
"""

from __future__ import annotations

import argparse
import random
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from prefix.errors import UserError
from prefix.preemption import EXIT_PREEMPTED
from prefix.runs.goodput import PARTS, account
from prefix.tools import schedule as scheduled
from prefix.tools.chaos import ChaosError, kill_plan, losses, same_weights
from prefix.tools.processes import Launch, Tail, checkout_file
from prefix.tools.schedule import KINDS, Costs, Schedule

PVC_PATH = "/home/apluser/runs"  # where both the manifests and the Run:ai script mount the runs volume
RESCHEDULES = ("same-node", "new-node", "resubmit")
DEFAULT_ARGS = ["trainer.device=cpu", "trainer.max_steps=150"]
"""With --config configs/tiny.yaml of this checkout in front, when no arguments are given."""


@dataclass
class Pod:
    """A container command and its environment, as the cluster would start it."""

    command: list[str]
    env: dict[str, str]
    grace: float
    fail_job: frozenset[int] = frozenset()
    """Exit codes on which the pod's Job fails without retrying (its podFailurePolicy; Run:ai sets none)."""


def policy_codes(job: dict, action: str) -> set[int]:
    """The container exit codes a Job's podFailurePolicy answers with `action` (FailJob, Ignore, Count)."""
    rules = job["spec"].get("podFailurePolicy", {}).get("rules", [])
    return {code for r in rules if r["action"] == action and r.get("onExitCodes", {}).get("operator") == "In"
            for code in r["onExitCodes"]["values"]}


def from_manifest(run_name: str, train_args: list[str]) -> Pod:
    """The single-node Job's container, rendered by k8s/render.py."""
    rendered = subprocess.run([sys.executable, str(checkout_file("k8s/render.py", "--source runai")), "job.yaml", "--run-name", run_name,
                               "--image", "local", "--gpus", "2", "--", *train_args],
                              capture_output=True, text=True, check=True).stdout
    (job,) = [d for d in yaml.safe_load_all(rendered) if d and d.get("kind") == "Job"]
    spec = job["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    env = {e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e}
    return Pod([*container["command"], *container.get("args", [])], env, float(spec["terminationGracePeriodSeconds"]),
               frozenset(policy_codes(job, "FailJob")))


def from_submit_script(run_name: str, train_args: list[str]) -> Pod:
    """The command `runai/submit_train.sh --dry-run` prints: what Run:ai would start in the pod."""
    printed = subprocess.run([str(checkout_file("runai/submit_train.sh", "--source job")), "--dry-run", "--run-name", run_name,
                              "--project", "local", "--image", "local", "--pvc", "runs", "--gpus", "2",
                              "--", *train_args], capture_output=True, text=True, check=True).stdout
    words = shlex.split(printed)
    cut = words.index("--command")
    env = dict(words[i + 1].split("=", 1) for i, w in enumerate(words[:cut]) if w == "-e")
    grace = words[words.index("--termination-grace-period") + 1].rstrip("s")
    return Pod(words[cut + 2:], env, float(grace))


@dataclass
class Report:
    preemptions: int = 0
    kills: int = 0
    """Preemptions by SIGKILL without warning (`--kind kill` or `mix`)."""
    flushed_in_grace: int = 0
    exit_codes: list[int | None] = field(default_factory=list)
    """The pod's exit code after each SIGTERM; None: still running at the end of the grace period (SIGKILLed)."""
    fail_job: list[int] = field(default_factory=list)
    """Those of the codes on which the pod's Job would have failed for good."""
    reschedules: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RESCHEDULES, 0))
    steps_redone: int = 0
    compared: bool = True
    losses_identical: bool = False
    weights_identical: bool = False
    goodput: dict | None = None
    """`prefix.runs.goodput.account` of the run's ledger."""
    costs: Costs | None = None
    predicted: float | None = None
    """The goodput the Young–Daly model gives for the measured costs (on a schedule)."""
    wall_s: float = 0.0

    def record(self, kind: str, flushed: bool, code: int | None, reschedule: str, pod: Pod) -> None:
        self.preemptions += 1
        self.kills += kind == "kill"
        self.flushed_in_grace += flushed
        self.exit_codes.append(code)
        if code in pod.fail_job:
            self.fail_job.append(code)
        self.reschedules[reschedule] += 1

    @property
    def codes_ok(self) -> bool:
        """Every start that ended inside the grace period exited 143, and none with a code that fails the Job."""
        return all(c in (None, EXIT_PREEMPTED) for c in self.exit_codes) and not self.fail_job

    @property
    def ok(self) -> bool:
        return (not self.compared or self.losses_identical and self.weights_identical) and self.codes_ok

    def __str__(self) -> str:
        yes = {True: "yes", False: "NO"} if self.compared else dict.fromkeys((True, False), "not compared")
        codes = ", ".join("killed" if c is None else str(c) for c in self.exit_codes) or "-"
        g, lines = self.goodput, []
        if g and g["wall"]:
            shares = ", ".join(f"{p} {100 * g['parts'][p] / g['wall']:.1f} %" for p in PARTS)
            lines.append(f"goodput            {100 * g['goodput']:.1f} % of {g['wall']:.1f} s over {g['starts']} "
                         f"starts ({shares}); down between starts {g['down']:.1f} s")
        if self.predicted is not None and g:
            lines.append(f"model              {100 * self.predicted:.1f} % ({self.costs}; a preemption every "
                         f"{g['wall'] / self.preemptions:.1f} s, {self.kills} of {self.preemptions} SIGKILL)")
        return "\n".join([
            f"preemptions        {self.preemptions}" + (f" ({self.kills} SIGKILL)" if self.kills else ""),
            f"flushed in grace   {self.flushed_in_grace}/{self.preemptions - self.kills}",
            f"exit codes         {codes}" + (f" (FailJob: {self.fail_job})" if self.fail_job else ""),
            "reschedules        " + ", ".join(f"{k} {n}" for k, n in self.reschedules.items()),
            f"steps redone       {self.steps_redone}",
            f"losses identical   {yes[self.losses_identical]}",
            f"weights identical  {yes[self.weights_identical]}",
            *lines,
            f"wall time          {self.wall_s:.1f} s",
            "PASS" if self.ok else "FAIL"])


class Cluster:
    """Runs pods of one run name on this machine: the runs volume and node caches are folders."""

    def __init__(self, root: Path, source: str, train_args: list[str]):
        self.root, self.source, self.train_args = root, source, train_args
        self.volume = root / "pvc"
        self.volume.mkdir(parents=True, exist_ok=True)
        self.nodes = 0

    def pod(self, run_name: str, resubmitted: bool = False) -> Pod:
        build = from_submit_script if resubmitted or self.source == "runai" else from_manifest
        return build(run_name, self.train_args)

    def new_node_cache(self) -> Path:
        self.nodes += 1
        return self.root / f"node{self.nodes}-cache"

    def start(self, pod: Pod, run_name: str, cache: Path) -> Launch:
        env = {**pod.env, "PREFIX_RUNS_ROOT": pod.env.get("PREFIX_RUNS_ROOT", PVC_PATH).replace(PVC_PATH, str(self.volume)),
               "PREFIX_CACHE_DIR": str(cache), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
        return Launch(pod.command, self.volume / run_name, env=env)


def finish(launch: Launch) -> None:
    """A start that ends by itself must exit 0: otherwise the daemon, not the cluster, failed."""
    scheduled.wait_exit(launch, 900)
    if launch.proc.returncode != 0:
        raise ChaosError(f"a start exited {launch.proc.returncode} by itself; see {launch.log}")


def at_random(cluster: Cluster, cache: Path, preemptions: int, rng: random.Random, report: Report, echo) -> None:
    """`preemptions` SIGTERMs, each at a random moment after the start's first step, then a reschedule."""
    pod, plan = cluster.pod("sim"), kill_plan(preemptions, RESCHEDULES, rng)
    for reschedule in [*plan, None]:
        with cluster.start(pod, "sim", cache) as launch:
            # no preemption planned, or the run finished before it came
            if (launch.wait_for(launch.steps, 600) != "hit" or reschedule is None
                    or scheduled.wait_exit(launch, rng.uniform(0.2, 2.0))):
                finish(launch)
                break
            flushed, code = scheduled.preempt(launch, "term", pod.grace)  # the kubelet's SIGTERM to PID 1
        report.record("term", flushed, code, reschedule, pod)
        echo(f"preemption {report.preemptions}: {'flushed' if flushed else 'SIGKILLed'} in grace, exit "
             f"{'-' if code is None else code}; rescheduled: {reschedule}")
        if reschedule == "new-node":
            cache = cluster.new_node_cache()
        pod = cluster.pod("sim", resubmitted=reschedule == "resubmit")


def play(preemptions: int, seed: int, root: Path, source: str = "job", train_args: list[str] | None = None,
         echo=print, schedule: Schedule | None = None, compare: bool = True) -> Report:
    """Preempt the run `preemptions` times at random (or on `schedule`), let it finish, account its time and
    compare it with an uninterrupted run (unless not `compare`)."""
    began, report = time.monotonic(), Report(compared=compare)
    train_args = train_args or ["--config", str(checkout_file("configs/tiny.yaml", "training arguments")), *DEFAULT_ARGS]
    cluster = Cluster(root, source, train_args)
    cache = cluster.new_node_cache()
    if compare:
        with cluster.start(cluster.pod("baseline"), "baseline", cache) as base:
            finish(base)
    run_dir, done = cluster.volume / "sim", []
    if schedule is None:
        at_random(cluster, cache, preemptions, random.Random(seed), report, echo)
    else:
        pod = cluster.pod("sim")
        done = scheduled.play(lambda: cluster.start(pod, "sim", cache), schedule, pod.grace, finish, echo)
        for p in done:
            report.record(p.kind, p.flushed, p.code, "same-node", pod)
    mine = losses(run_dir)
    report.steps_redone = len(Tail(run_dir / "metrics" / "train.jsonl", from_start=True).read()) - len(mine)
    if compare:
        report.losses_identical = mine == losses(cluster.volume / "baseline")
        report.weights_identical = same_weights(run_dir, cluster.volume / "baseline")
    report.goodput = account(run_dir / "metrics", killed=scheduled.killed(done))
    if schedule is not None:
        report.costs = scheduled.measure(run_dir, report.goodput)
        report.predicted = scheduled.predict(report.costs, report.goodput["wall"], report.goodput["starts"],
                                             report.kills, report.preemptions - report.kills)
    report.wall_s = time.monotonic() - began
    return report


def positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


def share(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, not {text}")
    return value


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preemptions", type=int, default=None,
                   help="preemptions at random moments (default 3); with --preempt-every: at most this many")
    p.add_argument("--preempt-every", type=positive, metavar="S",
                   help="preempt every S seconds (after the previous preemption) until the run completes")
    p.add_argument("--kind", choices=KINDS, default="term", help="with --preempt-every: SIGTERM and the grace "
                   "period (term), SIGKILL without warning (kill), or one of the two at random (mix)")
    p.add_argument("--jitter", type=share, default=0.0, metavar="J",
                   help="with --preempt-every: each gap drawn in S × [1 - J, 1 + J] (default 0)")
    p.add_argument("--no-compare", dest="compare", action="store_false",
                   help="skip the uninterrupted run and the bitwise comparison with it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source", choices=("job", "runai"), default="job",
                   help="build the command from k8s/job.yaml or from runai/submit_train.sh --dry-run")
    p.add_argument("--root", type=Path, help="folder for the volume and node caches (default: temporary)")
    p.add_argument("train_args", nargs="*", help="arguments for prefix.train (default: the tiny config on CPU)")


def run(args: argparse.Namespace) -> int:
    if args.preempt_every is None and (args.kind != "term" or args.jitter):
        raise UserError("--kind and --jitter: only with --preempt-every S; add it, or drop them")
    schedule = None if args.preempt_every is None else \
        Schedule(args.preempt_every, args.kind, args.jitter, args.seed, args.preemptions)
    root = args.root or Path(tempfile.mkdtemp(prefix="prefix-simulate-"))
    try:
        report = play(3 if args.preemptions is None else args.preemptions, args.seed, root, args.source,
                      args.train_args or None, schedule=schedule, compare=args.compare)
    except ChaosError as e:
        print(f"simulate: {e}", file=sys.stderr)
        return 1
    print(report)
    return 0 if report.ok else 1
