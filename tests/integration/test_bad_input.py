"""Every bad input a user can hand the daemon: one `error:` line naming the problem and the fix,
exit code 2, no traceback, and the runs folder byte-for-byte as it was (a new run leaves nothing).

Each row is a real `python -m prefix.train` start; `setup` prepares the runs folder (a finished run,
a damaged checkpoint, a file where a folder should be) and may return extra arguments.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import TINY, RunsCode, assert_clean_exit_2, assert_workers_exit_2, run, train_cmd

from prefix.checkpoint import files

NAME = "bad"
Setup = Callable[[Path, Path], list[str] | None]


def row(id: str, fragment: str, *args: str, yaml: str | None = None, env: dict[str, str] | None = None,
        name: str = NAME, setup: Setup | None = None, marks=()):
    return pytest.param(fragment, list(args), yaml, env or {}, name, setup, id=id, marks=marks)


# -- setups: (runs root, a finished 10-step run to copy) -> extra arguments ----------------------

def finished_copy(root: Path, finished: Path) -> Path:
    shutil.copytree(finished, root / NAME)
    return root / NAME / "checkpoints"


def old_format(root: Path, finished: Path) -> None:
    latest = finished_copy(root, finished) / "latest.pt"
    torch.save({**torch.load(latest, weights_only=True), "format_version": 1}, latest)


def truncated(root: Path, finished: Path) -> None:
    latest = finished_copy(root, finished) / "latest.pt"
    latest.write_bytes(latest.read_bytes()[:1000])


def pickled_code(root: Path, finished: Path) -> None:
    latest = finished_copy(root, finished) / "latest.pt"
    files.write_durably({"step": 10, "payload": RunsCode(root / "pwned")}, latest)


def folder_for_a_file(root: Path, finished: Path) -> None:
    latest = finished_copy(root, finished) / "latest.pt"
    latest.unlink()
    latest.mkdir()


def unreadable_manifest_only(root: Path, finished: Path) -> None:
    folder = finished_copy(root, finished)
    for manifest in folder.glob("manifest-*.json"):
        manifest.write_text("{not json")


def resumed_copy(root: Path, finished: Path) -> None:
    finished_copy(root, finished)


def run_dir_is_a_file(root: Path, _: Path) -> None:
    (root / NAME).write_text("not a folder")


def checkpoints_is_a_file(root: Path, _: Path) -> None:
    (root / NAME).mkdir()
    (root / NAME / "checkpoints").write_text("not a folder")


def runs_root_is_a_file(root: Path, _: Path) -> list[str]:
    (root / "a-file").write_text("not a folder")
    return ["--runs-root", str(root / "a-file")]


def empty_dataset(root: Path, _: Path) -> list[str]:
    (root.parent / "data" / "train").mkdir(parents=True)
    return [f"data.local={root.parent / 'data'}"]


def damaged_index(root: Path, _: Path) -> list[str]:
    (root.parent / "data" / "train").mkdir(parents=True)
    (root.parent / "data" / "train" / "index.json").write_text("")
    return [f"data.local={root.parent / 'data'}"]


def short_samples(root: Path, _: Path) -> list[str]:
    from prefix.data.corpus import default_cache_dir, ensure_default_corpus
    corpus, _built = ensure_default_corpus(default_cache_dir(None), 64, 0.02)  # windows of 65 tokens
    return [f"data.local={corpus}", "model.seq_len=128"]


def cache_is_a_file(root: Path, _: Path) -> None:
    (root.parent / "cache-file").write_text("not a folder")


ROWS = [
    # config files
    row("yaml-syntax", "bad.yaml: not valid YAML at line 3", yaml="trainer:\n  max_steps: [1,\n"),
    row("unknown-key", "trainer.max_stepz: unknown key (did you mean 'max_steps'?)", yaml="trainer:\n  max_stepz: 3\n"),
    row("unknown-section", "trainr: unknown section (did you mean 'trainer'?)", yaml="trainr:\n  max_steps: 3\n"),
    row("wrong-type", "trainer.max_steps: expected int, got 'many'", yaml="trainer:\n  max_steps: many\n"),
    row("not-a-mapping", "must hold a mapping of sections", yaml="- trainer\n- model\n"),
    row("section-not-a-mapping", "trainer: expected a mapping of keys", yaml="trainer: 5\n"),
    row("missing-config", "config file not found", "--config", "/nonexistent/x.yaml"),
    # command-line overrides
    row("override-syntax", "overrides look like section.key=value", "max_steps=3"),
    row("override-unknown", "trainer.bogus: unknown key", "trainer.bogus=1"),
    row("override-bool", "data.shuffle: expected bool", "data.shuffle=maybe"),
    row("negative-lr", "trainer.lr: must be positive", "trainer.lr=-1e-3"),
    row("min-lr-above-lr", "trainer.min_lr: must be between 0 and trainer.lr", "trainer.min_lr=1"),
    row("indivisible-batch", "trainer.global_batch_size: 10 is not divisible", "trainer.global_batch_size=10",
        "trainer.micro_batch_size=4"),
    row("heads", "model.d_model: 64 is not divisible by model.n_head=3", "model.n_head=3"),
    row("device", "trainer.device: must be auto, cpu, cuda or mps", "trainer.device=tpu"),
    row("cuda-missing", "trainer.device: cuda was asked for but no CUDA device is visible", "trainer.device=cuda",
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is attached")),
    row("remote-without-local", "data.local: must be set when data.remote is set", "data.remote=s3://b/x"),
    row("nonfinite-policy", "trainer.on_nonfinite: must be skip or stop", "trainer.on_nonfinite=ignore"),
    # run names and run directories
    row("name-with-slash", "not a valid run name", name="team/run1"),
    row("name-dotdot", "not a valid run name", name=".."),
    row("name-too-long", "not a valid run name", name="r" * 64),
    row("run-dir-is-a-file", "exists and is not a directory", setup=run_dir_is_a_file),
    row("checkpoints-is-a-file", "checkpoints: exists and is not a directory", setup=checkpoints_is_a_file),
    row("runs-root-is-a-file", "a-file: exists and is not a directory", setup=runs_root_is_a_file),
    # data
    row("missing-dataset", "data.local: no MDS dataset", "data.local=/nonexistent/data"),
    row("empty-dataset", "data.local: no MDS dataset", setup=empty_dataset),
    row("damaged-index", "index.json is not a readable MDS index", setup=damaged_index),
    row("vocab-too-small", "model.vocab_size: 200 cannot hold", "model.vocab_size=200"),
    row("samples-too-short", "model.seq_len: 128 needs samples of 129 tokens", setup=short_samples),
    # checkpoints
    row("old-format", "latest.pt: written in checkpoint format 1; this prefix reads format 2", setup=old_format),
    row("truncated-only-checkpoint", "no usable checkpoint (latest.pt: damaged or truncated", setup=truncated),
    row("pickle-runs-code", "latest.pt: refused: loading it would run code", setup=pickled_code),
    row("checkpoint-is-a-folder", "latest.pt: cannot be read", setup=folder_for_a_file),
    row("manifest-unreadable", "manifest is unreadable", setup=unreadable_manifest_only),
    row("config-drift", "model.n_layer 2 → 3 would corrupt the run", "model.n_layer=3", setup=resumed_copy),
    # environment
    row("rank-not-int", "RANK='abc' in the environment is not an integer", env={"RANK": "abc"}),
    row("world-without-torchrun", "WORLD_SIZE=2 but RANK, MASTER_ADDR, MASTER_PORT not set", env={"WORLD_SIZE": "2"}),
    row("cache-dir-is-a-file", "data.cache_dir: cannot build the default corpus", setup=cache_is_a_file,
        env={"PREFIX_CACHE_DIR": "{tmp}/cache-file"}),
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 10-step run (one checkpoint, at step 10) for the checkpoint rows to copy."""
    root = tmp_path_factory.mktemp("finished")
    assert run(train_cmd(0, "done", root, "trainer.max_steps=10")).returncode == 0
    return root / "done"


def contents(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (None for a folder)."""
    out: dict[str, bytes | None] = {}
    for folder, dirs, names in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(folder, d), root)] = None
        for n in names:
            out[os.path.relpath(os.path.join(folder, n), root)] = Path(folder, n).read_bytes()
    return out


def test_the_table_has_at_least_25_rows():
    assert len(ROWS) >= 25


@pytest.mark.parametrize("fragment,args,yaml,env,name,setup", ROWS)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(tmp_path, finished, fragment, args, yaml, env, name,
                                                          setup):
    root = tmp_path / "runs"
    root.mkdir()
    config = TINY
    if yaml is not None:
        config = tmp_path / "bad.yaml"
        config.write_text(yaml)
    args = [*args, *((setup(root, finished) if setup else None) or [])]
    before = contents(root)
    env = {k: v.format(tmp=tmp_path) for k, v in env.items()}
    result = run(train_cmd(0, name, root, *args, config=config), env=env)
    assert_clean_exit_2(result, fragment)
    assert contents(root) == before, "the runs folder changed"
    assert not (root / "pwned").exists()


def test_world_dependent_error_under_torchrun_names_the_fix(tmp_path):
    """torchrun itself exits 1 when a worker fails; the worker's own exit code is 2."""
    result = run(train_cmd(2, "bad", tmp_path, "trainer.global_batch_size=6", "trainer.micro_batch_size=2"))
    assert_workers_exit_2(result, "error: trainer.global_batch_size: 6 is not divisible by micro_batch_size × world size")
