"""k8s/ manifests, k8s/render.py, the Dockerfile and the repo's shell scripts, checked offline.

Every rendered document is validated strictly (unknown fields fail) against the newest Kubernetes
schema kubernetes-validate bundles; a missing schema fails. Then the preemption invariants of
docs/cluster.md are asserted one by one.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from helpers import REPO

from prefix.errors import EXIT_FENCED, EXIT_USER

K8S = REPO / "k8s"
VENV_BIN = Path(sys.executable).parent
RUNS_ROOT = "/home/apluser/runs"
K8S_VERSION = kubernetes_validate.latest_version()
RUN = "r1-demo"
ARGS = ["--config", "configs/demo.yaml", "trainer.max_steps=5000", "trainer.sample_prompt=def f(x): # 'q' $HOME"]
NODES = 3
GPUS = 8

_spec = importlib.util.spec_from_file_location("k8s_render", K8S / "render.py")
render_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render_mod)


def render(template: str, *argv: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(render_mod.render(template, list(argv))) if d is not None]


SAMPLES = {
    "pvc.yaml": ["--pvc", "team-runs", "--storage", "2Ti"],
    "job.yaml": ["--run-name", RUN, "--image", "reg.example/prefix:1.0", "--gpus", str(GPUS), "--pvc", "team-runs",
                 "--", *ARGS],
    "job-multinode.yaml": ["--run-name", RUN, "--image", "reg.example/prefix:1.0", "--gpus", str(GPUS),
                           "--nodes", str(NODES), "--pvc", "team-runs", "--", *ARGS],
}
JOBS = ["job.yaml", "job-multinode.yaml"]


def test_every_template_has_a_sample():
    assert sorted(p.name for p in K8S.glob("*.yaml")) == sorted(SAMPLES)


@pytest.mark.parametrize("template", sorted(SAMPLES))
def test_validates_strictly(template):
    docs = render(template, *SAMPLES[template])
    assert docs
    for doc in docs:
        # Raises SchemaNotFoundError for a kind/apiVersion without a bundled schema: a failure, not a skip.
        assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_strict_validation_is_not_a_no_op():
    job = render("job.yaml", *SAMPLES["job.yaml"])[0]
    bad = copy.deepcopy(job)
    bad["spec"]["template"]["spec"]["restartPolicyy"] = "Never"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    bad = copy.deepcopy(job)
    bad["spec"]["podFailurePolicy"]["rules"][0]["action"] = 7
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def job_of(template: str) -> dict:
    (job,) = [d for d in render(template, *SAMPLES[template]) if d["kind"] == "Job"]
    return job


def container(job: dict) -> dict:
    (c,) = job["spec"]["template"]["spec"]["containers"]
    return c


def env(c: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c["env"]}


@pytest.mark.parametrize("template", JOBS)
def test_preemption_invariants(template):
    job = job_of(template)
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert job["metadata"]["name"] == RUN
    assert pod["restartPolicy"] == "Never"  # podFailurePolicy requires it
    assert spec["podReplacementPolicy"] == "Failed"
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] > 0
    rules = spec["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
    by_code = {a: [r["onExitCodes"] for r in rules if r["action"] == a and "onExitCodes" in r]
               for a in ("FailJob", "Ignore")}
    # `prefix launch`'s codes: a user error fails the Job, a fenced start is replaced without counting;
    # every other code (143, 124, 1) is retried, counted unless the pod was disrupted.
    assert by_code == {"FailJob": [{"containerName": "train", "operator": "In", "values": [EXIT_USER]}],
                       "Ignore": [{"containerName": "train", "operator": "In", "values": [EXIT_FENCED]}]}
    # The DisruptionTarget rule comes first: a preempted pod is never counted, whatever its exit code.
    assert rules[0]["action"] == "Ignore" and "onPodConditions" in rules[0]
    c = container(job)
    assert c["name"] == "train"
    shutdown = int(env(c)["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"])
    assert shutdown >= 60
    assert pod["terminationGracePeriodSeconds"] > shutdown + 10
    assert c["resources"]["limits"]["nvidia.com/gpu"] == GPUS


@pytest.mark.parametrize("template", JOBS)
def test_pod_volumes_and_security(template):
    job = job_of(template)
    pod = job["spec"]["template"]["spec"]
    c = container(job)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert env(c)["PREFIX_RUNS_ROOT"] == RUNS_ROOT
    assert volumes[mounts[RUNS_ROOT]]["persistentVolumeClaim"]["claimName"] == "team-runs"
    sc = pod["securityContext"]
    assert sc["runAsNonRoot"] is True
    for key in ("runAsUser", "runAsGroup", "fsGroup"):
        assert isinstance(sc[key], int) and sc[key] > 0, key
    assert "runAsUser" not in c.get("securityContext", {})  # one place for the uid


@pytest.mark.parametrize("template", JOBS)
def test_heartbeat_probes(template):
    """Both probes run the heartbeat check on this run's directory; the watchdog acts first."""
    from prefix.config import WatchdogConfig

    c = container(job_of(template))
    check = ["python", "-m", "prefix.watchdog", f"{RUNS_ROOT}/{RUN}", "--max-age", "900", "--this-container"]
    startup, liveness = c["startupProbe"], c["livenessProbe"]
    assert startup["exec"]["command"] == liveness["exec"]["command"] == check
    assert 900 > WatchdogConfig().timeout_s, "the in-process watchdog, with its stack dump, fires first"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 3600, "time to the first step"


@pytest.mark.parametrize("template", JOBS)
def test_command_execs_the_launcher(template):
    job = job_of(template)
    c = container(job)
    assert "args" not in c
    bash, dash_c, script = c["command"]
    assert (bash, dash_c) == ("bash", "-c")
    words = shlex.split(script)
    assert words[:3] == ["exec", "prefix", "launch"]  # PID 1: gets the SIGTERM, exits with the workers' code
    nodes = 1 if template == "job.yaml" else NODES
    assert f"--nnodes={nodes}" in words and f"--nproc-per-node={GPUS}" in words
    assert ("--standalone" in words) == (nodes == 1)
    i = words.index("-m")
    assert words[i:] == ["-m", "prefix.train", "--run-name", job["metadata"]["name"], *ARGS]


def test_multinode():
    docs = render("job-multinode.yaml", *SAMPLES["job-multinode.yaml"])
    (svc,) = [d for d in docs if d["kind"] == "Service"]
    job = job_of("job-multinode.yaml")
    spec, pod_meta, pod = job["spec"], job["spec"]["template"]["metadata"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == NODES
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"].items() <= pod_meta["labels"].items()
    assert pod["subdomain"] == svc["metadata"]["name"]
    words = shlex.split(container(job)["command"][2])
    # Indexed Job pods are named <job>-<index>; with the subdomain, pod 0 resolves as <job>-0.<service>.
    assert f"--rdzv-endpoint={job['metadata']['name']}-0.{svc['metadata']['name']}:29500" in words
    assert "--rdzv-backend=c10d" in words and f"--rdzv-id={RUN}" in words
    assert spec["backoffLimit"] == 6 * NODES


def test_grace_sets_the_shutdown_timeout():
    job = render("job.yaml", "--grace", "300", *SAMPLES["job.yaml"])[0]
    assert job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 300
    assert env(container(job))["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "285"


def test_pvc():
    (pvc,) = render("pvc.yaml", *SAMPLES["pvc.yaml"])
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["metadata"]["name"] == "team-runs"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def run_render(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(K8S / "render.py"), *argv], capture_output=True, text=True,
                          timeout=30)


def test_render_cli_prints_the_manifest():
    p = run_render("job.yaml", *SAMPLES["job.yaml"])
    assert p.returncode == 0, p.stderr
    assert yaml.safe_load(p.stdout)["metadata"]["name"] == RUN


BASE = ["--image", "reg/prefix:1", "--gpus", "8"]
BAD = {
    "uppercase": ["job.yaml", "--run-name", "R1", *BASE],
    "underscore": ["job.yaml", "--run-name", "r_1", *BASE],
    "starts with digit": ["job.yaml", "--run-name", "1r", *BASE],
    "ends with dash": ["job.yaml", "--run-name", "r1-", *BASE],
    "too long": ["job.yaml", "--run-name", "r" * 64, *BASE],
    "host name too long": ["job-multinode.yaml", "--run-name", "r" * 62, "--nodes", "10", *BASE],
    "no run name": ["job.yaml", *BASE],
    "no image": ["job.yaml", "--run-name", "r1", "--gpus", "8"],
    "quote in image": ["job.yaml", "--run-name", "r1", "--image", "a'b", "--gpus", "8"],
    "zero gpus": ["job.yaml", "--run-name", "r1", "--image", "x", "--gpus", "0"],
    "gpus not a number": ["job.yaml", "--run-name", "r1", "--image", "x", "--gpus", "many"],
    "nodes on single-node job": ["job.yaml", "--run-name", "r1", *BASE, "--nodes", "2"],
    "multinode without nodes": ["job-multinode.yaml", "--run-name", "r1", *BASE],
    "short grace": ["job.yaml", "--run-name", "r1", *BASE, "--grace", "20"],
    "bad storage": ["pvc.yaml", "--storage", "lots"],
    "bad pvc name": ["pvc.yaml", "--pvc", "Runs"],
    "newline in args": ["job.yaml", "--run-name", "r1", *BASE, "--", "a\nb"],
    "unknown template": ["nope.yaml"],
    "unknown flag": ["job.yaml", "--run-name", "r1", *BASE, "--gpu", "8"],
    "no template": [],
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_render_bad_input(case):
    with pytest.raises(render_mod.BadInput):
        render_mod.render(BAD[case][0], BAD[case][1:]) if BAD[case] else render_mod.parse_args([])


@pytest.mark.parametrize("case", ["uppercase", "no template", "unknown flag"])
def test_render_cli_bad_input_exit_2(case):
    p = run_render(*BAD[case])
    assert p.returncode == 2
    assert p.stdout == ""
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr


def test_dockerfile_uid_matches_manifests():
    text = (REPO / "Dockerfile").read_text()
    (uid,) = re.findall(r"^ARG APL_UID=(\d+)$", text, re.M)
    assert re.search(r"useradd --uid \"\$\{APL_UID\}\".* apluser\b", text)
    assert re.search(r"^USER \$\{APL_UID\}:\$\{APL_UID\}$", text, re.M)
    assert re.search(r"^WORKDIR /home/apluser/prefix$", text, re.M)
    assert not re.search(r"^ENTRYPOINT", text, re.M)  # would keep `exec prefix launch` from being PID 1
    assert re.search(r'pip install "torch==2\.13\.0" --index-url', text)
    for template in JOBS:
        sc = job_of(template)["spec"]["template"]["spec"]["securityContext"]
        assert sc["runAsUser"] == sc["runAsGroup"] == sc["fsGroup"] == int(uid)


def shellcheck() -> str:
    exe = VENV_BIN / "shellcheck"
    path = str(exe) if exe.exists() else shutil.which("shellcheck")
    assert path, "shellcheck is missing: pip install -c constraints.txt -e '.[dev]'"
    return path


def test_shellcheck_repo_scripts():
    skip = {".git", ".venv", ".cache", "runs", "build"}
    scripts = [p for p in REPO.rglob("*.sh") if not skip & set(p.relative_to(REPO).parts)]
    if scripts:
        p = subprocess.run([shellcheck(), *map(str, scripts)], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stdout + p.stderr
    else:
        shellcheck()


@pytest.mark.parametrize("template", JOBS)
def test_shellcheck_pod_command(template, tmp_path):
    script = tmp_path / "command.sh"
    argv = [*SAMPLES[template][: SAMPLES[template].index("--")], "--", "--config", "configs/demo.yaml", "x.y=1"]
    (job,) = [d for d in render(template, *argv) if d["kind"] == "Job"]
    script.write_text("#!/bin/bash\n" + container(job)["command"][2] + "\n")
    p = subprocess.run([shellcheck(), str(script)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
