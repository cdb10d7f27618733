"""The open model families (Llama 3.x, Mistral, Qwen2) both ways, in process and offline: a tiny random
model made by transformers itself imports through model.init_from's code path with the same logits, a
prefix model exported with prefix's conversion loads in `AutoModelForCausalLM` with the same logits, what
prefix cannot represent is refused with one line, and a model with the new keys unset is the old one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from families import (
    FAMILIES,
    LLAMA3_SCALING,
    SHAPE,
    TOKENS,
    TOL,
    hf_model,
    model_keys,
    randomise_vectors,
    transformers,
)

from prefix import config, drift, hf, pretrained
from prefix.config import ConfigError, ModelConfig
from prefix.config import doc as config_doc
from prefix.errors import UserError
from prefix.model import GPT, llama3_scaled


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_transformers_model_imports_with_the_same_logits(family, tmp_path):
    theirs = hf_model(family)
    theirs.save_pretrained(tmp_path)  # safetensors
    m = model_keys(family, init_from=str(tmp_path))
    init = pretrained.check_init_from(m)  # what prefix.train does on a fresh start
    torch.manual_seed(1)
    ours = GPT(m)
    init.load_into(ours)
    with torch.no_grad():
        diff = max_diff(ours.eval()(TOKENS)[0], theirs(TOKENS).logits)
    print(f"{family}: import max |diff| {diff:.2e}")
    assert diff < TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_an_export_loads_in_transformers_with_the_same_logits(family, tmp_path):
    from safetensors.torch import save_file

    m = model_keys(family)
    torch.manual_seed(2)
    ours = GPT(m).eval()
    randomise_vectors(ours, 3)
    save_file(hf.to_hf(ours.state_dict(), m), str(tmp_path / hf.WEIGHTS), metadata={"format": "pt"})
    (tmp_path / hf.CONFIG).write_text(json.dumps(hf.hf_config(m, eos_id=256)))
    theirs = transformers().AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(theirs).__name__ == hf.FAMILIES[m.family][1]
    with torch.no_grad():
        logits = ours(TOKENS)[0]
        diff = max_diff(logits, theirs(TOKENS).logits)
        print(f"{family}: export max |diff| {diff:.2e}")
        assert diff < TOL
        assert torch.equal(pretrained.load_model(tmp_path)(TOKENS)[0], logits), "prefix → HF → prefix is exact"


@pytest.mark.parametrize("family,more", [("llama3", {}), ("mistral", dict(sliding_window=None)),
                                         ("qwen2", dict(sliding_window=64)), ("qwen2", dict(head_dim=16))])
def test_an_exported_config_reads_back_as_the_same_keys(family, more):
    m = model_keys(family, **more)
    assert hf.shape_of(hf.hf_config(m, None), "x") == hf.model_shape(m)


def test_llama3_frequencies_are_transformers_own():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers().LlamaConfig(**SHAPE, rope_theta=500000.0,
                                     rope_scaling={"rope_type": "llama3", **LLAMA3_SCALING})
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    plain = 1.0 / 500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    ours = llama3_scaled(plain, config.RopeScaling(**LLAMA3_SCALING))
    torch.testing.assert_close(ours.float(), theirs, rtol=1e-6, atol=0)
    kept, slowed = torch.isclose(ours, plain), torch.isclose(ours, plain / 8)
    assert kept[0] and slowed[-1] and (~kept & ~slowed).any(), "every regime is exercised"


# -- what is refused ----------------------------------------------------------------------------------------

def one_line(error: pytest.ExceptionInfo, *fragments: str) -> None:
    text = str(error.value)
    assert "\n" not in text and all(f in text for f in fragments), text


@pytest.mark.parametrize("keys,fragments", [
    (dict(family="mistral", sliding_window=32, seq_len=64), ("model.sliding_window", "shorter than model.seq_len=64")),
    (dict(sliding_window=4096), ("model.sliding_window", "family mistral or qwen2 only")),
    (dict(family="qwen2"), ("model.qkv_bias", "must be true for family qwen2")),
    (dict(qkv_bias=True), ("model.qkv_bias",)),
    (dict(family="gemma"), ("model.family", "llama, mistral or qwen2")),
    (dict(n_head=4, n_kv_head=3), ("model.n_kv_head", "must divide model.n_head=4")),
    (dict(head_dim=15), ("model.head_dim", "even")),
    (dict(rope_scaling={"factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0}), ("model.rope_scaling",)),
])
def test_impossible_model_keys_are_one_line_config_errors(keys, fragments):
    with pytest.raises(ConfigError) as e:
        config.from_dict({"model": keys})
    one_line(e, *fragments)


def saved_config(tmp_path: Path, cls: str, **settings) -> Path:
    getattr(transformers(), cls)(**SHAPE, **settings).save_pretrained(tmp_path)  # config.json only
    return tmp_path


@pytest.mark.parametrize("cls,settings,fragment", [
    ("LlamaConfig", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling type 'yarn'"),
    ("LlamaConfig", dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling type 'linear'"),
    ("LlamaConfig", dict(attention_bias=True), "attention_bias"),
    ("LlamaConfig", dict(mlp_bias=True), "mlp_bias"),
    ("MistralConfig", dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    ("Qwen2Config", dict(num_key_value_heads=3), "3 key/value heads for 4 heads"),
    ("GPT2Config", dict(), "model_type 'gpt2' is not a Llama, Mistral or Qwen2"),
])
def test_a_folder_prefix_cannot_represent_is_refused_with_one_line(cls, settings, fragment, tmp_path):
    if cls == "GPT2Config":
        transformers().GPT2Config().save_pretrained(tmp_path)
    else:
        saved_config(tmp_path, cls, **settings)
    with pytest.raises(UserError) as e:
        hf.read_config(tmp_path, "model.init_from")
    one_line(e, "model.init_from:", fragment)


def test_a_mistral_window_must_be_configured_and_cover_the_context(tmp_path):
    """Mistral 7B v0.1 attends 4096 tokens back: a run sets model.sliding_window=4096 and a seq_len up to it."""
    folder = saved_config(tmp_path, "MistralConfig", num_key_value_heads=2, rms_norm_eps=1e-5)  # default window
    (folder / hf.WEIGHTS).write_bytes(b"")  # only its name is checked before the shape
    m = model_keys("mistral", n_kv_head=2, head_dim=None, sliding_window=None, init_from=str(folder))
    with pytest.raises(UserError) as e:
        pretrained.check_init_from(m)
    one_line(e, "set model.sliding_window=4096")
    assert pretrained.check_init_from(model_keys("mistral", n_kv_head=2, head_dim=None, sliding_window=4096,
                                         init_from=str(folder))).shape["sliding_window"] == 4096
    with pytest.raises(ConfigError) as e:
        model_keys("mistral", sliding_window=4096, seq_len=8192)
    one_line(e, "model.sliding_window: 4096 is shorter than model.seq_len=8192")


def test_a_qwen2_without_sliding_layers_has_no_window(tmp_path):
    shape = hf.read_config(saved_config(tmp_path, "Qwen2Config", num_key_value_heads=2, use_sliding_window=True,
                                        sliding_window=16,
                                        max_window_layers=2))  # both layers below max_window_layers: full
    assert shape["sliding_window"] is None and shape["qkv_bias"] and shape["family"] == "qwen2"


def test_init_from_names_the_new_keys_to_set(tmp_path):
    hf_model("llama3").save_pretrained(tmp_path)
    m = model_keys("llama3", n_kv_head=None, rope_scaling=None, init_from=str(tmp_path))
    with pytest.raises(UserError) as e:
        pretrained.check_init_from(m)
    one_line(e, "set model.n_kv_head=2 model.rope_scaling={", '"original_max_position_embeddings": 48}')


# -- unset, the new keys change nothing ------------------------------------------------------------------------

OLD_KEYS = [("tok_emb.weight", [257, 64]),
            *[(f"blocks.0.{name}", shape) for name, shape in [
                ("attn_norm.weight", [64]), ("attn.qkv.weight", [192, 64]), ("attn.proj.weight", [64, 64]),
                ("mlp_norm.weight", [64]), ("mlp.gate.weight", [100, 64]), ("mlp.up.weight", [100, 64]),
                ("mlp.down.weight", [64, 100])]],
            ("norm.weight", [64]), ("head.weight", [257, 64])]
"""The state dict of a 1-layer, 2-head, d 64 untied GPT before the families: its names, order and shapes."""


def test_default_keys_give_the_old_state_dict_and_explicit_defaults_the_same_model():
    base = dict(vocab_size=257, seq_len=32, n_layer=1, n_head=2, d_model=64, mlp_hidden=100, tie_embeddings=False)
    torch.manual_seed(0)
    plain = GPT(ModelConfig(**base))
    assert [(k, list(v.shape)) for k, v in plain.state_dict().items()] == OLD_KEYS
    torch.manual_seed(0)
    explicit = GPT(ModelConfig(**base, n_kv_head=2, head_dim=32))
    idx = TOKENS[:, :32]
    with torch.no_grad():
        assert torch.equal(plain(idx)[0], explicit(idx)[0])
    assert plain.flops_per_token() == 6 * plain.num_params() + 12 * 1 * 64 * 32


def test_grouped_query_attention_shapes_params_and_flops():
    m = model_keys("qwen2")  # 4 heads, 2 key/value heads of width 24, q/k/v biases, tied
    model = GPT(m)
    attn = model.blocks[0].attn
    assert attn.qkv.weight.shape == ((4 + 2 * 2) * 24, 64) and attn.qkv.bias.shape == (192,)
    assert attn.proj.weight.shape == (64, 4 * 24) and not attn.qkv.bias.any(), "biases start at zero"
    per_block = 192 * 64 + 192 + 64 * 96 + 3 * 64 * 100 + 2 * 64
    assert model.num_params() == 257 * 64 + 2 * per_block + 64
    assert model.flops_per_token() == 6 * model.num_params() + 12 * 2 * 4 * 24 * 64


def test_rope_scaling_prints_loads_back_and_is_protected_on_resume(tmp_path):
    cfg = config.from_dict({"model": {"rope_scaling": {"factor": 32}, "n_kv_head": 2}})
    assert cfg.model.rope_scaling == config.RopeScaling(factor=32.0)
    path = tmp_path / "printed.yaml"
    path.write_text(config_doc.describe(cfg))
    assert config.load(path) == cfg
    now = config.from_dict({"model": {"rope_scaling": {"factor": 16}, "n_kv_head": 2}}).to_dict()
    with pytest.raises(drift.ConfigDrift) as e:
        drift.check(cfg.to_dict(), now, step=5, allow=False)
    one_line(e, "model.rope_scaling")
    saved = cfg.to_dict()
    renamed = {**saved, "model": {**saved["model"], "family": "mistral"}}  # the same weights, another export
    assert drift.check(saved, renamed, step=5, allow=False) == {"model.family": ["llama", "mistral"]}
