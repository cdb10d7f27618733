"""The default corpus's cache name comes from a stat of each standard-library file, not from reading it."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import pytest

from prefix.data import corpus


@pytest.fixture
def stdlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "lib"
    for name in ("a.py", "pkg/b.py", "site-packages/c.py", "pkg/__pycache__/d.py", "notes.txt"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"# {name}\n")
    paths = sysconfig.get_paths()
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {**paths, "stdlib": str(root)})
    return root


def test_the_files_are_the_libraries_own(stdlib: Path) -> None:
    root, files = corpus.stdlib_files()
    assert root == stdlib and [f.relative_to(root).as_posix() for f in files] == ["a.py", "pkg/b.py"]


def test_the_key_follows_paths_sizes_and_mtimes(stdlib: Path) -> None:
    key = corpus._corpus_key(64, 0.02)
    assert corpus._corpus_key(64, 0.02) == key and corpus._corpus_key(128, 0.02) != key
    os.utime(stdlib / "a.py", ns=(1, 1))
    assert corpus._corpus_key(64, 0.02) != key
