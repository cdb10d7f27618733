"""checkpoint.keep_every_steps end to end: a real 2-rank torchrun run keeps every N-th step as
checkpoints/step-<N>/, and `prefix export --step N` / `prefix sample --step N` read it.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from helpers import Launch, assert_clean_exit_2, assert_same_weights, checkpoint, read_jsonl, run, train_cmd

from prefix.checkpoint import history
from prefix.checkpoint.resume import verify_save
from prefix.hf import WEIGHTS, to_hf

# every_steps 3 does not divide 4: the kept steps are saved anyway.
SETTINGS = ("trainer.max_steps=8", "checkpoint.every_steps=3", "checkpoint.keep_every_steps=4",
            "trainer.eval_every=0")
CLI = [sys.executable, "-m", "prefix.cli"]


def trained(root: Path, *settings: str) -> Path:
    launch = Launch(train_cmd(2, "r", root, *settings), root / "log")
    assert launch.wait() == 0, (root / "log").read_text()[-3000:]
    return root / "r"


def exported(run_dir: Path, out: Path, *extra: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    result = run([*CLI, "export", run_dir.name, "--runs-root", str(run_dir.parent), "--out", str(out), *extra])
    assert result.returncode == 0, result.stderr[-2000:]
    return load_file(out / WEIGHTS)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return trained(tmp_path_factory.mktemp("history"), *SETTINGS)


def test_every_nth_step_is_kept_whole_and_rotation_leaves_it(run_dir):
    ckpts = run_dir / "checkpoints"
    assert history.kept(ckpts) == [4, 8]
    saves = [r["step"] for r in read_jsonl(run_dir / "metrics" / "checkpoint.jsonl") if r["ok"]]
    # 6, or, if step 4's write was still in flight at 6, the first boundary after it (6 skipped, owed);
    # the kept steps 4 and 8 are never skipped
    assert saves[:2] == [3, 4] and saves[3:] == [8] and 6 <= saves[2] < 8, saves
    for step in (4, 8):
        assert verify_save(ckpts / f"step-{step}") == []
        assert sorted(p.name for p in (ckpts / f"step-{step}").glob("latest*")) == [
            "latest.pt", "latest_rank0.pt", "latest_rank1.pt"]
    assert sorted(int(p.name.split("-")[1]) for p in ckpts.glob("manifest-*.json")) == [saves[2], 8]
    assert not list(ckpts.glob("*.tmp"))
    events = [e for e in read_jsonl(run_dir / "logs" / "rank0.jsonl") if e["event"] == "checkpoint kept"]
    assert [e["step"] for e in events] == [4, 8]


def test_export_step_gives_that_steps_weights(run_dir, tmp_path):
    kept = checkpoint(run_dir, "step-4/latest.pt")
    latest = checkpoint(run_dir)
    assert (kept.step, latest.step) == (4, 8)
    weights = exported(run_dir, tmp_path / "step4", "--step", "4")
    assert_same_weights(weights, to_hf(kept.model, kept.model_config()))
    assert not torch.equal(weights["model.embed_tokens.weight"], latest.model["tok_emb.weight"])
    assert_same_weights(exported(run_dir, tmp_path / "latest"), to_hf(latest.model, latest.model_config()))


def test_sample_step_reads_the_kept_step(run_dir):
    result = run([*CLI, "sample", "r", "--runs-root", str(run_dir.parent), "--step", "4", "--tokens", "8",
                  "--prompt", "def "])
    assert result.returncode == 0 and result.stdout.startswith("def "), result.stderr[-2000:]
    assert "step 4 (step-4/)" in result.stderr


def test_a_missing_or_damaged_step_is_one_line_and_exit_2(run_dir, tmp_path):
    missing = run([*CLI, "export", "r", "--runs-root", str(run_dir.parent), "--out", str(tmp_path / "o"),
                   "--step", "6"])
    assert_clean_exit_2(missing, "step 6 was not kept (kept steps: 4, 8)")
    copy = tmp_path / "r"
    shutil.copytree(run_dir, copy)
    rank_file = copy / "checkpoints" / "step-4" / "latest_rank1.pt"
    data = bytearray(rank_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    rank_file.write_bytes(bytes(data))
    damaged = run([*CLI, "sample", "r", "--runs-root", str(tmp_path), "--step", "4", "--tokens", "4"])
    assert_clean_exit_2(damaged, "step-4: latest_rank1.pt: damaged")


def test_a_kept_step_of_a_sharded_run_verifies_and_exports(tmp_path):
    run_dir = trained(tmp_path, "trainer.parallelism=fsdp", "trainer.max_steps=4", "checkpoint.every_steps=0",
                      "checkpoint.keep_every_steps=2", "trainer.eval_every=0")
    ckpts = run_dir / "checkpoints"
    assert history.kept(ckpts) == [2, 4]
    assert len(list((ckpts / "step-2").glob("sharded-2-*/__*.distcp"))) == 2, "both ranks' shards"
    assert verify_save(ckpts / "step-2") == []
    kept = checkpoint(run_dir, "step-2/latest.pt")
    assert kept.sharded and kept.step == 2
    assert_same_weights(exported(run_dir, tmp_path / "out", "--step", "2"), to_hf(kept.model, kept.model_config()))
