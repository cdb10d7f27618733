"""trainer.parallelism=fsdp keeps the promises of DDP: the same numbers, and exact resume after any stop.

Real torchrun, 2 ranks on gloo, FSDP2 and sharded DCP checkpoints on CPU, real signals.
"""

from __future__ import annotations

import dataclasses
import random
import sys
from pathlib import Path

import pytest
from families import FAMILIES, TOKENS, TOL, hf_model, model_keys, transformers
from helpers import (
    REPO,
    TINY,
    Launch,
    assert_clean_exit_2,
    assert_same_run,
    assert_same_weights,
    checkpoint,
    losses,
    read_jsonl,
    run,
    train_cmd,
)

from prefix.tools import chaos
from prefix.tools.chaos_report import OWN_PROCESSES

FSDP = "trainer.parallelism=fsdp"
STEPS = 60
SETTINGS = (FSDP, f"trainer.max_steps={STEPS}", "checkpoint.every_steps=10", "trainer.eval_every=20")


def finished(cmd: list[str], log: Path) -> None:
    result = Launch(cmd, log).wait()
    assert result == 0, log.read_text()[-3000:]
    assert "Aborted" not in log.read_text() and "core dumped" not in log.read_text()


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    """The FSDP run, never interrupted."""
    root = tmp_path_factory.mktemp("fsdp-baseline")
    finished(train_cmd(2, "base", root, *SETTINGS), root / "log")
    return root / "base"


def test_fsdp_equals_ddp_bitwise_with_clipping_inactive(tmp_path: Path) -> None:
    same = ("trainer.max_steps=20", "trainer.grad_clip=0", "checkpoint.every_steps=10", "trainer.eval_every=10",
            "trainer.sample_every=10", "trainer.sample_tokens=6")  # under fsdp every rank samples: no hang
    finished(train_cmd(2, "ddp", tmp_path, *same), tmp_path / "ddp.log")
    finished(train_cmd(2, "fsdp", tmp_path, *same, FSDP), tmp_path / "fsdp.log")
    assert len(losses(tmp_path / "fsdp")) == 20
    assert losses(tmp_path / "fsdp") == losses(tmp_path / "ddp")
    assert checkpoint(tmp_path / "fsdp").sharded and not checkpoint(tmp_path / "ddp").sharded
    assert_same_weights(checkpoint(tmp_path / "fsdp").model, checkpoint(tmp_path / "ddp").model)
    evals = [read_jsonl(tmp_path / run_ / "metrics" / "eval.jsonl") for run_ in ("ddp", "fsdp")]
    assert [e["val_loss"] for e in evals[0]] == [e["val_loss"] for e in evals[1]]
    samples = [read_jsonl(tmp_path / run_ / "metrics" / "samples.jsonl") for run_ in ("ddp", "fsdp")]
    assert len(samples[1]) == 2 and [s["text"] for s in samples[0]] == [s["text"] for s in samples[1]]


def test_fsdp_sigterm_resume_is_bitwise_identical(baseline: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    first = Launch(train_cmd(2, "r", tmp_path, *SETTINGS), tmp_path / "log1")
    first.wait_for_step(run_dir, random.randint(5, 40))
    first.sigterm()
    assert first.wait() != 0
    stopped_at = max(losses(run_dir))
    assert stopped_at < STEPS and checkpoint(run_dir).step == stopped_at
    finished(train_cmd(2, "r", tmp_path, *SETTINGS), tmp_path / "log2")
    assert any(e["event"] == f"resumed from step {stopped_at}" for e in read_jsonl(run_dir / "logs" / "rank0.jsonl"))
    assert_same_run(run_dir, baseline)


def test_fsdp_sigkill_of_every_process_resumes_bitwise(baseline: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    first = Launch(train_cmd(2, "r", tmp_path, *SETTINGS), tmp_path / "log1")
    first.wait_for_step(run_dir, random.randint(15, 45))
    first.kill_all()
    killed_at, saved = max(losses(run_dir)), checkpoint(run_dir).step
    assert saved <= killed_at < STEPS
    finished(train_cmd(2, "r", tmp_path, *SETTINGS), tmp_path / "log2")
    assert read_jsonl(run_dir / "meta" / "starts.jsonl")[-1]["start_step"] == saved
    assert_same_run(run_dir, baseline)
    folders = sorted(p.name for p in (run_dir / "checkpoints").glob("sharded-*"))
    assert len(folders) == 2, f"only latest's and prev's folders stay: {folders}"


def test_fsdp_chaos_kills_of_every_kind_leave_the_run_bitwise_identical(tmp_path: Path) -> None:
    report = chaos.play(TINY, kills=6, seed=2, runs_root=tmp_path, overrides=("trainer.max_steps=150", FSDP),
                        kinds=OWN_PROCESSES)
    print(report)
    assert len(report.kills) == 6 and report.unreadable == 0
    assert report.losses_identical and report.weights_identical and report.ok


def test_a_fsdp_checkpoint_does_not_resume_as_ddp(baseline: Path) -> None:
    result = run(train_cmd(0, "base", baseline.parent, *SETTINGS[1:], f"trainer.max_steps={STEPS + 5}"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "trainer.parallelism: the checkpoint of step 60 was written with fsdp" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_start_that_cannot_fit_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    result = run(train_cmd(0, "big", tmp_path, "trainer.device=cpu", config=REPO / "configs" / "llama3-8b-cpt.yaml"))
    assert_clean_exit_2(result, "plan: the 8.03B-parameter llama model needs")
    assert "`prefix plan` shows the breakdown" in result.stderr
    assert not (tmp_path / "big").exists()


def test_one_process_fsdp_run_exits_zero_and_never_aborts_at_teardown(tmp_path: Path) -> None:
    """SIGABRT was seen at interpreter exit after FSDP; a group of one (no torchrun) takes the same path."""
    for attempt in range(2):  # a finished run, then its restart: both tear down a process group
        result = run(train_cmd(0, "one", tmp_path, FSDP, "trainer.max_steps=6", "checkpoint.every_steps=3"))
        assert result.returncode == 0, (attempt, result.returncode, result.stderr[-3000:])
        assert "Aborted" not in result.stderr and "terminate called" not in result.stderr
    assert checkpoint(tmp_path / "one").step == 6 and checkpoint(tmp_path / "one").sharded


@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_trains_under_fsdp_from_its_transformers_folder_and_exports_back(family: str, tmp_path: Path) -> None:
    """Each rank reads only its rows of the folder (sliced safetensors reads) into its shards: with a learning
    rate of 1e-10 the two trained steps leave the weights the folder's, so a row in the wrong place shows."""
    import torch
    import yaml

    theirs = hf_model(family)
    theirs.save_pretrained(tmp_path / "hf")
    keys = {k: v for k, v in dataclasses.asdict(model_keys(family)).items() if v is not None}
    cfg = yaml.safe_load(TINY.read_text())
    cfg["model"] = {**keys, "init_from": str(tmp_path / "hf")}
    cfg["trainer"].update(max_steps=2, lr=1e-10, min_lr=0.0, warmup_steps=0, eval_every=0)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    finished(train_cmd(2, "r", tmp_path, FSDP, config=tmp_path / "c.yaml"), tmp_path / "log")
    assert checkpoint(tmp_path / "r").sharded

    cli = [sys.executable, "-m", "prefix.cli"]
    result = run([*cli, "export", "r", "--runs-root", str(tmp_path), "--out", str(tmp_path / "out")])
    assert result.returncode == 0, result.stderr[-2000:]
    back = transformers().AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        diff = (back(TOKENS).logits - theirs(TOKENS).logits).abs().max().item()
    assert diff < TOL, f"{family}: {diff:.2e}"
    if family == "llama3":  # sampling reads the sharded checkpoint too
        result = run([*cli, "sample", "r", "--runs-root", str(tmp_path), "--tokens", "8", "--prompt", "def "])
        assert result.returncode == 0 and result.stdout.startswith("def "), result.stderr[-2000:]


def test_compile_bf16_and_activation_checkpointing_compose_with_fsdp(tmp_path: Path) -> None:
    """Each block compiled in place before it is sharded, bf16 through MixedPrecisionPolicy, blocks recomputed
    in backward: the run trains, and its checkpoint keeps the plain model's names (it resumes eager, fp32)."""
    fast = ("trainer.compile=true", "trainer.precision=bf16", "trainer.activation_checkpointing=true")
    finished(train_cmd(0, "fast", tmp_path, FSDP, *fast, "trainer.max_steps=8", "checkpoint.every_steps=4"),
             tmp_path / "log1")
    run_dir = tmp_path / "fast"
    (event,) = [e for e in read_jsonl(run_dir / "logs" / "rank0.jsonl") if e["event"] == "fast path"]
    assert event["compile"] and event["precision"] == "bf16" and event["activation_checkpointing"]
    loss = losses(run_dir)
    assert len(loss) == 8 and loss[8] < loss[1] - 0.5
    weights = checkpoint(run_dir).model
    assert not any(k.startswith(("_orig_mod", "module")) or "_orig_mod" in k for k in weights)
    finished(train_cmd(0, "fast", tmp_path, FSDP, "trainer.max_steps=10", "checkpoint.every_steps=4"), tmp_path / "log2")
    assert max(losses(run_dir)) == 10
