"""Tests for prefix.model: shapes, deterministic init, causality, weight tying, checkpoint round-trip,
generation, optimizer groups, and that the model can learn."""

from __future__ import annotations

import math

import pytest
import torch

from prefix.config import ModelConfig
from prefix.model import GPT, apply_rotary, mlp_width, param_groups, rope_cache

CFG = ModelConfig(vocab_size=257, seq_len=32, n_layer=2, n_head=2, d_model=64)


def make(seed: int = 0, cfg: ModelConfig = CFG) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg)


def tokens(b: int, t: int, seed: int = 1, vocab: int = CFG.vocab_size) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def test_forward_shapes_and_initial_loss():
    model = make()
    idx = tokens(3, CFG.seq_len)
    logits, loss = model(idx, targets=tokens(3, CFG.seq_len, seed=2))
    assert logits.shape == (3, CFG.seq_len, CFG.vocab_size)
    assert logits.dtype == torch.float32
    assert loss is not None and loss.dim() == 0 and torch.isfinite(loss)
    assert abs(loss.item() - math.log(CFG.vocab_size)) < 0.1  # near-uniform predictions at init
    logits, loss = model(idx[:, :5])  # shorter than seq_len, no targets
    assert logits.shape == (3, 5, CFG.vocab_size) and loss is None
    with pytest.raises(ValueError, match="seq_len"):
        model(tokens(1, CFG.seq_len + 1))


def test_loss_is_mean_cross_entropy_over_all_positions():
    model = make()
    idx, tgt = tokens(2, 8), tokens(2, 8, seed=3)
    logits, loss = model(idx, tgt)
    manual = -torch.log_softmax(logits, -1).gather(-1, tgt.unsqueeze(-1)).mean()
    torch.testing.assert_close(loss, manual)


def test_same_seed_bit_identical_different_seed_differs():
    a, b, c = make(7).state_dict(), make(7).state_dict(), make(8).state_dict()
    assert a.keys() == b.keys() == c.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    random_weights = [n for n in a if a[n].dim() >= 2]
    assert random_weights and all(not torch.equal(a[n], c[n]) for n in random_weights)


def test_init_statistics():
    cfg = ModelConfig(vocab_size=257, seq_len=32, n_layer=4, n_head=2, d_model=128, init_std=0.05)
    model = make(cfg=cfg)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.05, rel=0.05)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.05, rel=0.05)
    scaled = 0.05 / math.sqrt(2 * cfg.n_layer)
    assert model.blocks[0].attn.proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert model.blocks[0].mlp.down.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert torch.equal(model.norm.weight, torch.ones(cfg.d_model))


def test_architecture_names_no_biases_and_mlp_width():
    model = make()
    names = set(model.state_dict())
    for name in ("tok_emb.weight", "norm.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
                 "blocks.1.mlp.gate.weight", "blocks.1.mlp.up.weight", "blocks.1.mlp.down.weight",
                 "blocks.0.attn_norm.weight", "blocks.0.mlp_norm.weight"):
        assert name in names
    assert not any("bias" in n for n in names)
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    assert all(isinstance(m.attn_norm, torch.nn.RMSNorm) for m in model.blocks)
    assert model.blocks[0].mlp.gate.out_features == mlp_width(CFG) == 192  # 8/3·64 = 170.7 → 192
    assert mlp_width(ModelConfig(d_model=128)) == 384  # 341.3 → 384
    assert mlp_width(ModelConfig(d_model=96)) == 256  # exactly 256 stays 256
    assert mlp_width(ModelConfig(d_model=64, mlp_hidden=100)) == 100


def test_causality():
    model = make()
    idx = tokens(2, CFG.seq_len)
    t = 11
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % CFG.vocab_size
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_rotary_depends_on_relative_position_only():
    cos, sin = rope_cache(16, 64, 10000.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m: int, n: int) -> torch.Tensor:
        return (apply_rotary(q, cos[m], sin[m]) * apply_rotary(k, cos[n], sin[n])).sum()

    torch.testing.assert_close(score(5, 2), score(40, 37), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 3))
    torch.testing.assert_close(apply_rotary(q, cos[0], sin[0]), q)  # position 0 is the identity
    # rotate-half pairing: dims i and i + hd/2 rotate together by angle pos·theta^(-2i/hd)
    x = torch.zeros(16)
    x[0] = 1.0
    out = apply_rotary(x, cos[3], sin[3])
    torch.testing.assert_close(out[[0, 8]], torch.tensor([math.cos(3.0), math.sin(3.0)]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_is_bitwise_the_textbook_rotate_half(dtype: torch.dtype) -> None:
    """One roll with the sign folded into the table: the values the chunk/neg/cat form gives, to the bit, so
    a run's results (and its checkpoints) are those of the model before the change."""
    hd, T = 32, 96
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)
    cos, sin = (torch.cat((angles, angles), -1).cos().float(), torch.cat((angles, angles), -1).sin().float())
    x = torch.randn(2, 3, T, hd).to(dtype)
    x1, x2 = x.chunk(2, dim=-1)
    textbook = (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(dtype)
    assert torch.equal(apply_rotary(x, *rope_cache(hd, T, 10000.0)), textbook)


def test_model_sees_positions():
    """Without positions, one layer of causal attention sees the last token's prefix as a set: swapping
    two earlier tokens could not change its logits. RoPE must make it change."""
    model = make(cfg=ModelConfig(vocab_size=257, seq_len=32, n_layer=1, n_head=2, d_model=64))
    idx = tokens(1, 12)
    swapped = idx[:, [1, 0, *range(2, 12)]]
    assert not torch.allclose(model(idx)[0][0, -1], model(swapped)[0][0, -1], atol=1e-4)


def test_tied_head_counted_once():
    model = make()
    assert model.head.weight is model.tok_emb.weight
    assert model.head.weight.data_ptr() == model.tok_emb.weight.data_ptr()
    every = sum(p.numel() for m in model.modules() for p in m.parameters(recurse=False))
    assert model.num_params() == every - CFG.vocab_size * CFG.d_model
    n = model.num_params()
    assert model.flops_per_token() == 6 * n + 12 * CFG.n_layer * CFG.d_model * CFG.seq_len


def test_state_dict_round_trip_and_rotary_not_saved():
    model, fresh = make(1), make(2)
    sd = model.state_dict()
    assert "tok_emb.weight" in sd
    assert not any("rope" in k for k in sd)
    fresh.load_state_dict(sd)
    assert fresh.head.weight is fresh.tok_emb.weight  # loading keeps the tie
    idx = tokens(2, 16)
    assert torch.equal(model(idx)[0], fresh(idx)[0])


def test_generate():
    model = make()
    prompt = tokens(2, 5)
    out = model.generate(prompt, max_new_tokens=7, temperature=0)
    assert out.shape == (2, 12) and out.dtype == torch.long
    assert torch.equal(out[:, :5], prompt)
    assert torch.equal(out, model.generate(prompt, max_new_tokens=7, temperature=0))
    expected_first = model(prompt)[0][:, -1].argmax(-1)
    assert torch.equal(out[:, 5], expected_first)

    for mode in (True, False):
        model.train(mode)
        model.generate(prompt, 2, temperature=1.0, top_k=5)
        assert model.training is mode

    long_prompt = tokens(1, CFG.seq_len + 10)  # longer than seq_len: cropped, not an error
    out = model.generate(long_prompt, max_new_tokens=3, temperature=0.8, top_k=10)
    assert out.shape == (1, CFG.seq_len + 13)

    s1 = model.generate(prompt, 6, generator=torch.Generator().manual_seed(5))
    s2 = model.generate(prompt, 6, generator=torch.Generator().manual_seed(5))
    assert torch.equal(s1, s2)
    assert ((0 <= s1) & (s1 < CFG.vocab_size)).all()


def test_generate_top_k_restricts_choices():
    model = make()
    prompt = tokens(1, 4)
    top1 = model.generate(prompt, 1, temperature=0)
    for seed in range(5):
        sampled = model.generate(prompt, 1, temperature=5.0, top_k=1, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(sampled, top1)


def test_param_groups():
    model = make()
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    grouped = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in model.parameters()}
    no_decay_ids = {id(p) for p in no_decay["params"]}
    norms = [m.weight for m in model.modules() if isinstance(m, torch.nn.RMSNorm)]
    assert norms and all(id(w) in no_decay_ids for w in norms)
    assert id(model.tok_emb.weight) in {id(p) for p in decay["params"]}
    torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)  # accepted as is


def test_model_learns_repeated_batch():
    model = make()
    idx = tokens(4, CFG.seq_len + 1, seed=9)
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=3e-3)
    first = model(x, y)[1].item()
    for _ in range(25):
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert model(x, y)[1].item() < 0.7 * first


def test_peak_flops_are_known_only_for_listed_gpus():
    from prefix.model import PEAK_BF16_FLOPS, peak_flops

    assert peak_flops(torch.device("cpu")) is None, "no MFU on CPU: its peak is not known"
    assert PEAK_BF16_FLOPS["H100"] == 989e12


def test_an_empty_prompt_starts_a_new_document():
    """`prefix sample RUN` without --prompt: generation starts from end-of-document, which is not returned."""
    from prefix.data.tokenizers import BYTES
    from prefix.model import complete

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=257, seq_len=16, n_layer=1, n_head=2, d_model=32))
    text = complete(model, BYTES, "", 8, seed=0, device=torch.device("cpu"))
    again = complete(model, BYTES, "", 8, seed=0, device=torch.device("cpu"))
    assert text == again and 0 < len(text) <= 8, "eight new tokens, each one byte, and no end-of-document"
    assert complete(model, BYTES, "ab", 8, seed=0, device=torch.device("cpu")).startswith("ab")
