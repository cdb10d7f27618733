"""What a run ran on: the code version and an environment snapshot, written to meta/ at every start."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("prefix-train", "torch", "numpy", "mosaicml-streaming", "tokenizers", "tiktoken", "pyarrow", "psutil",
            "structlog", "pyyaml")


def code_version() -> dict[str, Any]:
    """The git commit (and whether the checkout had changes) when run from one, else $PREFIX_CODE_VERSION.

    An image build sets PREFIX_CODE_VERSION (e.g. to the commit it was built from); from a checkout,
    git is asked directly so a dirty tree cannot pass for its commit.
    """
    source = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5)
        if commit.returncode == 0:
            status = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10)
            return {"source": "git", "commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip()),
                    "path": str(source)}
    except (OSError, subprocess.TimeoutExpired):
        pass
    return {"source": "PREFIX_CODE_VERSION", "version": os.environ.get("PREFIX_CODE_VERSION", "unknown")}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def snapshot(world_size: int) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {
        "python": sys.version.split()[0], "platform": platform.platform(), "host": socket.gethostname(),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "world_size": world_size, "cpu_count": os.cpu_count(),
        "packages": {name: _version(name) for name in PACKAGES},
    }
