"""The GPU fast path's knobs, exercised by real training on the CPU (docs/performance.md).

trainer.compile, trainer.precision=bf16 and trainer.activation_checkpointing change how a step is
computed, never what a checkpoint holds: the same keys, shapes and dtypes (float32 master weights),
so a run can switch between them on resume. torch.compile runs for real here (inductor, with the
machine's C++ compiler); its first step costs ~25 s cold, seconds once inductor's cache is warm.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import assert_clean_exit_2, checkpoint, losses, read_jsonl, run, train_cmd

from prefix import config
from prefix.fast_path import autocast_dtype, wants_compile
from prefix.model import GPT
from prefix.optim import build_optimizer

STEPS = 3
FAST = (f"trainer.max_steps={STEPS}", "trainer.eval_every=0", "data.num_workers=0", "telemetry.system_every_s=0")


def train(root: Path, name: str, *overrides: str) -> Path:
    result = run(train_cmd(0, name, root, *FAST, *overrides))
    assert result.returncode == 0, result.stderr[-3000:]
    return root / name


def layout(state: dict) -> dict:
    """What the checkpoint format promises: keys and every tensor's shape and dtype (values aside)."""
    def describe(value):
        if isinstance(value, torch.Tensor):
            return (tuple(value.shape), value.dtype)
        if isinstance(value, dict):
            return {k: describe(v) for k, v in value.items()}
        return type(value).__name__
    return {"model": describe(state.model), "optimizer_state": describe(state.optimizer["state"]),
            "optimizer_groups": [sorted(g) for g in state.optimizer["param_groups"]], "keys": sorted(state.to_dict())}


@pytest.fixture(scope="module")
def eager(tmp_path_factory) -> Path:
    """fp32, eager, no recomputation: the reference run."""
    return train(tmp_path_factory.mktemp("eager"), "eager", "trainer.compile=false")


def test_eager_and_compiled_runs_resume_each_other_with_one_checkpoint_format(eager: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "switch"
    shutil.copytree(eager, run_dir)
    train(tmp_path, "switch", "trainer.compile=true", f"trainer.max_steps={STEPS + 2}")
    events = read_jsonl(run_dir / "logs" / "rank0.jsonl")
    assert any(e["event"] == f"resumed from step {STEPS}" for e in events)
    assert [e["compile"] for e in events if e["event"] == "fast path"] == [False, True]
    assert read_jsonl(run_dir / "meta" / "starts.jsonl")[-1]["config_changes"]["trainer.compile"] == [False, True]
    compiled = checkpoint(run_dir)
    assert compiled.step == STEPS + 2
    assert layout(compiled) == layout(checkpoint(eager))
    assert not any(k.startswith(("_orig_mod", "module")) for k in compiled.model)
    # and back: the compiled run's checkpoint resumes eager
    train(tmp_path, "switch", "trainer.compile=false", f"trainer.max_steps={STEPS + 3}")
    assert layout(checkpoint(run_dir)) == layout(checkpoint(eager))
    after = losses(run_dir)
    assert set(after) == set(range(1, STEPS + 4)) and all(math.isfinite(v) for v in after.values())


def test_bf16_autocast_trains_close_to_fp32_with_fp32_weights(eager: Path, tmp_path: Path) -> None:
    bf16_dir = train(tmp_path, "bf16", "trainer.compile=false", "trainer.precision=bf16")
    fp32, bf16 = losses(eager), losses(bf16_dir)
    assert set(bf16) == set(fp32) and all(math.isfinite(v) for v in bf16.values())
    assert [e["precision"] for e in read_jsonl(bf16_dir / "logs" / "rank0.jsonl") if e["event"] == "fast path"] == ["bf16"]
    # At initialisation the logits are near 0 and the loss near log(vocab) either way: close, not equal.
    assert bf16[1] != fp32[1], "autocast did not change the computation"
    assert all(abs(bf16[s] - fp32[s]) / fp32[s] < 0.02 for s in fp32), (bf16, fp32)
    weights, reference = checkpoint(bf16_dir).model, checkpoint(eager).model
    assert layout(checkpoint(bf16_dir)) == layout(checkpoint(eager))
    assert {v.dtype for v in weights.values()} == {torch.float32}, "master weights stay float32"
    assert not torch.equal(weights["tok_emb.weight"], reference["tok_emb.weight"])


def test_activation_checkpointing_gives_the_same_losses(eager: Path, tmp_path: Path) -> None:
    ac_dir = train(tmp_path, "ac", "trainer.compile=false", "trainer.activation_checkpointing=true")
    reference, recomputed = losses(eager), losses(ac_dir)
    assert set(recomputed) == set(reference)
    assert all(abs(recomputed[s] - reference[s]) <= 1e-6 for s in reference), (recomputed, reference)
    assert layout(checkpoint(ac_dir)) == layout(checkpoint(eager))


def test_mps_where_there_is_none_exits_2_with_one_line(tmp_path: Path) -> None:
    if torch.backends.mps.is_available():
        pytest.skip("this machine has an MPS device")
    result = run(train_cmd(0, "mps", tmp_path, "trainer.device=mps"))
    assert_clean_exit_2(result, "trainer.device: mps was asked for but this machine has no usable MPS device")
    assert not (tmp_path / "mps").exists(), "a refused start writes nothing"


def test_auto_settings_resolve_per_device() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("fp32", cuda) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    assert wants_compile("auto", cuda) and not wants_compile("auto", cpu) and not wants_compile(False, cuda)
    assert wants_compile(True, cpu)


def test_knobs_leave_model_and_optimizer_state_keys_alone() -> None:
    cfg = config.load(None, ["trainer.activation_checkpointing=true"])
    torch.manual_seed(0)
    plain = GPT(cfg.model)
    torch.manual_seed(0)
    recomputing = GPT(cfg.model)
    recomputing.activation_checkpointing = True
    assert plain.state_dict().keys() == recomputing.state_dict().keys()
    optimizer = build_optimizer(plain, cfg.trainer)
    assert optimizer.param_groups[0]["fused"] is None, "fused AdamW only for CUDA parameters"
    x = torch.randint(0, cfg.model.vocab_size, (2, 16))
    assert torch.equal(plain(x, x)[1], recomputing(x, x)[1])


def test_attention_meets_the_flash_kernel_conditions_under_bf16(monkeypatch) -> None:
    """FlashAttention (SDPA's flash backend on CUDA) needs: no mask (is_causal instead), no dropout, fp16/bf16
    q/k/v with a contiguous last dimension of at most 256. Checked on the call the model makes."""
    import torch.nn.functional as F

    calls, sdpa = [], F.scaled_dot_product_attention

    def record(q, k, v, *args, **kwargs):
        calls.append((q, k, v, args, kwargs))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", record)
    cfg = config.load(None, []).model
    x = torch.randint(0, cfg.vocab_size, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        GPT(cfg)(x, x)
    assert len(calls) == cfg.n_layer
    for q, k, v, args, kwargs in calls:
        assert not args and kwargs == {"is_causal": True}
        assert {t.dtype for t in (q, k, v)} == {torch.bfloat16}
        assert all(t.stride(-1) == 1 and t.shape[-1] <= 256 for t in (q, k, v))
