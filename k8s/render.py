"""Fill in a manifest of this folder and print it; pipe it to `kubectl apply -f -`.

    python k8s/render.py pvc.yaml [--pvc prefix-runs] [--storage 1Ti]
    python k8s/render.py job.yaml --run-name r1 --image reg/prefix:tag --gpus 8 [-- ARGS...]
    python k8s/render.py job-multinode.yaml --run-name r1 --image reg/prefix:tag --gpus 8 --nodes 2 [-- ARGS...]

ARGS go to `python -m prefix.train` after `--run-name` (e.g. `--config configs/demo.yaml trainer.max_steps=5000`),
which the pods start with `exec prefix launch` (torchrun, with exit codes the Job's podFailurePolicy acts on).
The templates hold `${NAME}` placeholders (string.Template); the output is parsed with PyYAML before it
is printed. Bad input: one `error: ...` line on stderr and exit code 2. Standard library + PyYAML only.
"""

from __future__ import annotations

import argparse
import re
import shlex
import string
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
# A Kubernetes DNS-1035 label: the Job, the Service and the pods' host names are all built from it.
K8S_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?")
FLUSH_SECONDS = 15  # between torchrun's SIGKILL of its workers and the kubelet's SIGKILL of the pod
FLAGS = {"RUN_NAME": "--run-name", "IMAGE": "--image", "GPUS": "--gpus", "NODES": "--nodes"}


class BadInput(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one `error:` line, exit 2 (argparse would print its usage too)
        raise BadInput(message)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """render.py's options; everything after the first `--` is prefix.train's arguments (`.args`)."""
    extra: list[str] = []
    if "--" in argv:
        argv, extra = argv[: argv.index("--")], argv[argv.index("--") + 1:]
    p = Parser(prog="render.py", allow_abbrev=False, usage="%(prog)s TEMPLATE [options] [-- ARGS of prefix.train...]",
               description=__doc__.split("\n\n")[0])
    p.add_argument("template", help="job.yaml, job-multinode.yaml, pvc.yaml (in k8s/) or a path")
    p.add_argument("--run-name", help="run name = Job name: lowercase letters, digits, '-'; at most 63")
    p.add_argument("--image", help="container image built from the Dockerfile")
    p.add_argument("--gpus", type=int, help="GPUs (= torchrun processes) per node")
    p.add_argument("--nodes", type=int, help="nodes (job-multinode.yaml only)")
    p.add_argument("--pvc", default="prefix-runs", help="PersistentVolumeClaim holding the runs (default: %(default)s)")
    p.add_argument("--storage", default="1Ti", help="size of the PVC (default: %(default)s)")
    p.add_argument("--grace", type=int, default=120,
                   help="terminationGracePeriodSeconds (default: %(default)s); torchrun's shutdown timeout is "
                        f"{FLUSH_SECONDS} s less: the final checkpoint must be written within it")
    p.add_argument("--backoff-limit", type=int, default=6,
                   help="failures that are not preemptions allowed per node (default: %(default)s)")
    a = p.parse_args(argv)
    a.args = extra
    return a


def check_name(flag: str, value: str, max_len: int = 63) -> str:
    if not K8S_NAME.fullmatch(value) or len(value) > max_len:
        raise BadInput(f"{flag} {value!r}: a Kubernetes name is lowercase letters, digits and '-', starts with "
                       f"a letter, ends with a letter or digit, at most {max_len} characters")
    return value


def values(a: argparse.Namespace) -> dict[str, str]:
    v = {"PVC": check_name("--pvc", a.pvc), "BACKOFF_LIMIT": str(a.backoff_limit * (a.nodes or 1))}
    if not QUANTITY.fullmatch(a.storage):
        raise BadInput(f"--storage {a.storage!r}: not a Kubernetes quantity such as 500Gi or 1Ti")
    v["STORAGE"] = a.storage
    if a.grace < 30:
        raise BadInput(f"--grace {a.grace}: at least 30 seconds (the final checkpoint needs time)")
    v["GRACE"], v["SHUTDOWN_TIMEOUT"] = str(a.grace), str(a.grace - FLUSH_SECONDS)
    if a.backoff_limit < 0:
        raise BadInput(f"--backoff-limit {a.backoff_limit}: must be 0 or more")
    if a.run_name is not None:
        # Pod host names of an Indexed Job are <run>-<index>: they must stay within 63 characters too.
        v["RUN_NAME"] = check_name("--run-name", a.run_name, 63 - len(f"-{(a.nodes or 1) - 1}") if a.nodes else 63)
    if a.image is not None:
        if not a.image or any(c.isspace() or c in "'\"$`\\" for c in a.image):
            raise BadInput(f"--image {a.image!r}: an image reference has no spaces, quotes or '$'")
        v["IMAGE"] = a.image
    for key, n, least in (("GPUS", a.gpus, 1), ("NODES", a.nodes, 1)):
        if n is not None:
            if n < least:
                raise BadInput(f"{FLAGS[key]} {n}: must be at least {least}")
            v[key] = str(n)
    if any("\n" in x or "\r" in x for x in a.args):
        raise BadInput("ARGS: no line breaks in prefix.train arguments")
    v["ARGS"] = shlex.join(a.args)
    return v


def render(template: str, argv: list[str]) -> str:
    """The manifest `template` filled in from render.py's command-line arguments `argv`."""
    a = parse_args([template, *argv])
    path = Path(a.template) if Path(a.template).is_file() else HERE / a.template
    if not path.is_file():
        raise BadInput(f"{a.template}: no such template (have: {', '.join(sorted(p.name for p in HERE.glob('*.yaml')))})")
    text = path.read_text()
    used = {m.group("named") or m.group("braced") for m in string.Template.pattern.finditer(text)} - {None}
    v = values(a)
    if a.nodes is not None and "NODES" not in used and a.nodes != 1:
        raise BadInput(f"--nodes {a.nodes}: {path.name} runs on one node; use job-multinode.yaml")
    missing = [FLAGS.get(k, k) for k in sorted(used) if k not in v]
    if missing:
        raise BadInput(f"{path.name} needs {', '.join(missing)}")
    out = string.Template(text).substitute(v)
    try:
        docs = [d for d in yaml.safe_load_all(out) if d is not None]
    except yaml.YAMLError as e:
        raise BadInput(f"the rendered {path.name} is not valid YAML: {e}".replace("\n", " ")) from None
    if not docs or not all(isinstance(d, dict) and "kind" in d for d in docs):
        raise BadInput(f"the rendered {path.name} holds no Kubernetes object")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if not argv or argv[0].startswith("-"):
            parse_args(argv)  # --help exits here
            raise BadInput("give the template first: render.py job.yaml --run-name ...")
        sys.stdout.write(render(argv[0], argv[1:]))
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
