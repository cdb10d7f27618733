import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def corpus_cache() -> Path:
    """One default-corpus cache for the whole session (make test points it at .cache/)."""
    cache = Path(os.environ.setdefault("PREFIX_CACHE_DIR", str(REPO / ".cache" / "prefix")))
    cache.mkdir(parents=True, exist_ok=True)
    return cache


@pytest.fixture
def tmpfs():
    """mount(path, kib): a size-limited tmpfs at `path` (again: resized); unmounted after the test.

    A real full disk for the disk-fault tests; mounting needs root (CAP_SYS_ADMIN), else the test skips.
    """
    mounted: list[Path] = []

    def mount(path: Path, kib: int) -> None:
        path.mkdir(parents=True, exist_ok=True)
        opts = f"remount,size={kib}k" if path in mounted else f"size={kib}k"
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.decode().strip()}")
        if path not in mounted:
            mounted.append(path)

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], check=True)
