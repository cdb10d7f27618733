"""`prefix plan` and the memory estimate behind it (prefix/memory.py): the shipped continued-pre-training
configs fit where they say they do, are refused where they cannot fit, and the advice is a computed one.
In-process, through `prefix.cli.main`; the models are built on the meta device only."""

from __future__ import annotations

import dataclasses

import pytest
from helpers import REPO

from prefix import cli, config, memory
from prefix.config import parse_size

LLAMA = REPO / "configs" / "llama3-8b-cpt.yaml"
QWEN = REPO / "configs" / "qwen2.5-0.5b-cpt.yaml"
GiB = 2**30


def plan(capsys, cfg, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["plan", "--config", str(cfg), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_sizes_take_binary_suffixes_in_any_case_and_keep_the_old_ones():
    assert parse_size("80GiB") == 80 * 2**30 == parse_size("80gib") == parse_size("80GB") == parse_size("80gb")
    assert parse_size("141GiB") == 141 * 2**30 and parse_size("512MiB") == 512 * 2**20
    assert parse_size("2TiB") == 2 * 2**40 and parse_size("4kib") == 4096
    assert parse_size("50gb") == 50 * 2**30 and parse_size("1000") == 1000 and parse_size("12x") is None
    assert parse_size("80gi") is None


def test_parameter_counts_are_the_released_models():
    assert memory.estimate(config.load(LLAMA), 8).n_params == 8_030_261_248  # Llama 3.1 8B
    assert memory.estimate(config.load(QWEN), 1).n_params == 494_032_768  # Qwen2.5 0.5B, tied embeddings


def test_llama_8b_fits_eight_80gib_gpus_with_fsdp(capsys):
    code, out, err = plan(capsys, LLAMA, "--nproc-per-node", "8", "--gpu-memory", "80GiB")
    assert code == 0 and err == "", err
    assert "fits" in out and "yes" in out.splitlines()[-1]


def test_llama_8b_with_ddp_is_refused_in_one_line_naming_fsdp(capsys):
    code, out, err = plan(capsys, LLAMA, "--nproc-per-node", "8", "--gpu-memory", "80GiB",
                          "trainer.parallelism=ddp")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: plan:") and "trainer.parallelism=fsdp" in lines[0], err
    last = out.splitlines()[-1]
    assert "set trainer.parallelism=fsdp" in last and last.endswith("fits"), out
    assert any(line.split() == ["fits", "no"] for line in out.splitlines()) and "prefix plan" in lines[0]


def test_qwen_half_b_fits_one_80gib_gpu(capsys):
    code, _, err = plan(capsys, QWEN, "--gpu-memory", "80GiB")
    assert code == 0, err


def test_a_model_too_big_for_the_gpus_names_how_many_fsdp_needs(capsys):
    code, out, err = plan(capsys, LLAMA, "--gpu-memory", "24GiB")
    assert code == 2 and len(err.strip().splitlines()) == 1
    cfg = config.load(LLAMA, ["trainer.micro_batch_size=1"])
    need = memory.min_gpus(cfg, 24 * GiB)
    assert need is not None and need > 8
    assert f"fsdp needs at least {need} GPUs" in err and f"fsdp needs at least {need} GPUs" in out
    assert memory.fits(memory.estimate(cfg, need), 24 * GiB), "the advice is the estimate's, not a guess"
    assert not memory.fits(memory.estimate(cfg, need - 1), 24 * GiB)


def test_advice_lowers_the_micro_batch_keeping_the_global_batch():
    cfg = config.load(LLAMA)
    tips = memory.advice(cfg, 8, 40 * GiB)
    assert len(tips) == 1 and "trainer.micro_batch_size=1" in tips[0] and tips[0].endswith("fits"), tips
    assert memory.advice(cfg, 8, 80 * GiB) == []


def test_activation_checkpointing_lowers_the_activations():
    cfg = config.load(LLAMA)
    on = memory.estimate(cfg, 8)
    off = memory.estimate(dataclasses.replace(
        cfg, trainer=dataclasses.replace(cfg.trainer, activation_checkpointing=False)), 8)
    assert on.activations == on.activations_with_ac < off.activations == off.activations_without_ac
    assert on.total < off.total


def test_fsdp_shards_the_weights_gradients_and_optimizer_over_the_ranks():
    cfg = config.load(LLAMA)
    one, eight = memory.estimate(cfg, 1), memory.estimate(cfg, 8)
    assert eight.params == one.params // 8 and eight.optimizer == one.optimizer // 8
    assert eight.activations == one.activations and eight.total < one.total
    ddp = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, parallelism="ddp"))
    assert memory.estimate(ddp, 8).params == memory.estimate(ddp, 1).params == 4 * one.n_params


def test_check_fits_raises_a_user_error_the_same_on_every_rank():
    cfg = config.load(LLAMA, ["trainer.parallelism=ddp"])
    with pytest.raises(memory.DoesNotFit) as caught:
        memory.check_fits(cfg, 8, 80 * GiB, "cuda:0")
    assert caught.value.exit_code == 2 and caught.value.same_on_every_rank
    assert "\n" not in str(caught.value) and "cuda:0 has 80.0 GiB" in str(caught.value)
    assert memory.check_fits(config.load(LLAMA), 8, 80 * GiB, "cuda:0").total < 80 * GiB


def test_without_a_gpu_the_command_asks_for_its_memory(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = plan(capsys, QWEN)
    assert code == 2 and "--gpu-memory" in err
