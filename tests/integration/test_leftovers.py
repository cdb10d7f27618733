"""Leftovers of killed runs (streaming's /dev/shm segments and lock files) never stop the next start.

Real processes and real files in /dev/shm; other jobs may run on this host meanwhile, so every
assertion is about this test's own files.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, TINY, Launch, run, train_cmd

from prefix import config
from prefix.data.compat import streaming
from prefix.data.corpus import default_cache_dir, ensure_default_corpus, write_split
from prefix.data.leftovers import LOCKS, REMOVAL_ORDER, SEGMENTS, SHM_DIR, clean_stale_streaming_state

unpack_locals = streaming.base.shared.prefix._unpack_locals

# Creates `path` and keeps it until stdin closes: mapped with its descriptor closed ("map"), or
# only open ("open"), the two ways /proc shows a file in use.
HOLD = """import mmap, sys
f = open(sys.argv[2], "w+b"); f.truncate(4096)
if sys.argv[1] == "map":
    m = mmap.mmap(f.fileno(), 4096); f.close()
print("ready", flush=True); sys.stdin.read()
"""

# A live job: a StreamingDataset kept open; it reads one more sample when told to, then exits.
LIVE = """import sys
from prefix.data.compat import StreamingDataset
ds = StreamingDataset(local=sys.argv[1], batch_size=1)
samples = iter(ds)
next(samples)
print("ready", flush=True); sys.stdin.readline()
assert len(next(samples)["tokens"]) == 9
"""


def python(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A helper process, started once it printed "ready"."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise AssertionError(f"helper process did not start: {proc.communicate()}")
    return proc


def unused_numbers(count: int) -> list[int]:
    """Prefix numbers far above any streaming has claimed, with no files yet."""
    start = random.randrange(900_000, 990_000)
    numbers = list(range(start, start + count))
    assert not [p for n in numbers for p in SHM_DIR.glob(f"{n:06}_*")]
    return numbers


def fabricate(number: int, lock_dir: Path) -> list[Path]:
    """The files a SIGKILLed dataset leaves: every segment of its number and both lock files."""
    files = [SHM_DIR / f"{number:06}_{n}" for n in SEGMENTS] + [lock_dir / f"{number:06}_{n}" for n in LOCKS]
    for f in files:
        f.touch()
    return files


def registering(folder: Path) -> list[Path]:
    """The `locals` segments registering `folder`: streaming refuses a remote dataset there."""
    found = []
    for segment in SHM_DIR.glob("*_locals"):
        try:
            folders, _ = unpack_locals(segment.read_bytes())
        except FileNotFoundError:  # removed meanwhile
            continue
        if str(folder) in folders:
            found.append(segment)
    return found


def test_stale_groups_are_removed_in_order_even_after_gaps(tmp_path: Path) -> None:
    """streaming's own cleaner stops at the first unused number: it would never reach these."""
    stale, after_gap, mapped, held = unused_numbers(12)[::3]
    other = SHM_DIR / f"{stale:06}_not_streaming"
    other.touch()
    holders = [python(HOLD, "map", str(SHM_DIR / f"{mapped:06}_barrier")),
               python(HOLD, "open", str(SHM_DIR / f"{held:06}_locals"))]
    try:
        files = {n: fabricate(n, tmp_path) for n in (stale, after_gap, mapped, held)}
        removed = clean_stale_streaming_state(lock_dir=tmp_path)
        assert not any(f.exists() for n in (stale, after_gap) for f in files[n])
        assert all(f.exists() for n in (mapped, held) for f in files[n]), "a group in use is kept whole"
        assert mapped not in removed and held not in removed
        assert other.exists(), "only streaming's names are touched"
        names = [Path(p).name.split("_", 1)[1] for p in removed[stale]]
        assert names == sorted(names, key=REMOVAL_ORDER.index) and names[-2:] == list(LOCKS)
    finally:
        for proc in holders:
            proc.communicate(timeout=10)
        other.unlink()
    clean_stale_streaming_state(lock_dir=tmp_path)
    assert not any(f.exists() for n in (mapped, held) for f in files[n]), "removed once no longer in use"


def test_a_live_jobs_files_are_never_touched(tmp_path: Path) -> None:
    (tmp_path / "tmp").mkdir()
    write_split([b"def f():\n    return 1\n" * 4] * 8, tmp_path / "ds", seq_len=8)
    live = python(LIVE, str(tmp_path / "ds"), env={**os.environ, "TMPDIR": str(tmp_path / "tmp")})
    try:
        [locals_segment] = registering(tmp_path / "ds")
        number = locals_segment.name.split("_")[0]
        in_use = [*SHM_DIR.glob(f"{number}_*"), *(tmp_path / "tmp").glob(f"{number}_*")]
        assert {"locals", "barrier", *LOCKS} <= {p.name.split("_", 1)[1] for p in in_use}
        stale = fabricate(unused_numbers(1)[0], tmp_path / "tmp")
        clean_stale_streaming_state(lock_dir=tmp_path / "tmp")
        assert all(p.exists() for p in in_use)
        assert not any(p.exists() for p in stale)
        live.stdin.write("go\n")
    finally:
        live.communicate(timeout=30)
    assert live.returncode == 0, "the live job still reads its data"


def test_sigkilled_run_with_a_remote_restarts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a container restart /dev/shm (the pod's) survives and /tmp (the container's) does not.

    streaming skips a prefix number while its lock files exist, so with the old /tmp a restart
    gets by; with a fresh one it finds the killed run's `locals` and refuses the same local folder.
    """
    cfg = config.load(TINY)
    corpus, _ = ensure_default_corpus(default_cache_dir(None), cfg.model.seq_len, cfg.data.val_fraction)
    settings = (f"data.remote={corpus}", f"data.local={tmp_path / 'local'}", "trainer.max_steps=6")
    cmd = train_cmd(2, "r", tmp_path, *settings)
    for tmp in ("tmp1", "tmp2"):
        (tmp_path / tmp).mkdir()

    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp1"))
    first = Launch(cmd, tmp_path / "log1")
    first.wait_for_step(tmp_path / "r", 2)
    first.kill_all()
    version = json.loads((corpus / "manifest.json").read_text())["content_hash"]
    stale = registering(tmp_path / "local" / version / "train")
    assert stale, "the killed run left its `locals` behind: without a cleanup the restart would fail"

    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp2"))
    second = run(cmd)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Reused local directory" not in second.stderr
    assert not any(p.exists() for p in stale)
