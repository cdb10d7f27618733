"""Tiny random models of the open families (Llama 3 with GQA and rope scaling, Mistral, Qwen2), made by
transformers itself, offline; and the model.* keys that describe each (tests/unit/test_families.py,
tests/integration/test_fsdp.py)."""

from __future__ import annotations

import torch

from prefix import config
from prefix.config import ModelConfig

TOL = 1e-4
"""Max abs logit difference allowed between prefix and transformers (float32, CPU)."""
TOKENS = torch.randint(0, 257, (2, 64), generator=torch.Generator().manual_seed(5))
SHAPE = dict(vocab_size=257, hidden_size=64, intermediate_size=100, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, initializer_range=0.08)  # larger logits show mistakes better
LLAMA3_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=48)
"""Llama 3.1's factors around a 48-token original context, so that the 8 frequencies of a 16-wide head
fall in every regime: kept (wavelength < 12), blended, slowed by the factor (wavelength > 48)."""

FAMILIES = {
    # family: (transformers config class and its settings, the matching model.* keys)
    "llama3": ("LlamaConfig",
               dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling={"rope_type": "llama3", **LLAMA3_SCALING},
                    tie_word_embeddings=False, rms_norm_eps=1e-5),
               dict(family="llama", n_kv_head=2, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING,
                    tie_embeddings=False)),
    "mistral": ("MistralConfig",
                dict(num_key_value_heads=1, head_dim=32, sliding_window=64, tie_word_embeddings=False,
                     rms_norm_eps=1e-5),
                dict(family="mistral", n_kv_head=1, head_dim=32, sliding_window=64, tie_embeddings=False)),
    "qwen2": ("Qwen2Config",
              dict(num_key_value_heads=2, head_dim=24, rope_theta=1000000.0, tie_word_embeddings=True,
                   rms_norm_eps=1e-5),
              dict(family="qwen2", n_kv_head=2, head_dim=24, qkv_bias=True, rope_theta=1000000.0,
                   tie_embeddings=True)),
}


def transformers():
    import transformers as tf

    tf.logging.set_verbosity_error()
    return tf


def model_keys(family: str, **more) -> ModelConfig:
    """The model.* keys of FAMILIES[family], read and validated as a config file would be."""
    keys = dict(vocab_size=257, seq_len=64, n_layer=2, n_head=4, d_model=64, mlp_hidden=100, **FAMILIES[family][2])
    return config.from_dict({"model": {**keys, **more}}).model


def randomise_vectors(model: torch.nn.Module, seed: int) -> None:
    """Norm gains and biases start at 1 and 0 on both sides; move them so that a mix-up would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def hf_model(family: str, seed: int = 0):
    tf = transformers()
    cls, settings, _ = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = getattr(tf, cls)(**SHAPE, **settings)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    randomise_vectors(model, seed)
    return model.eval()
