"""Config loading, overrides and validation; a bad config exits 2 with one line and no traceback."""

from __future__ import annotations

import pytest
from helpers import REPO, TINY

from prefix import config
from prefix.config import ConfigError


def test_shipped_configs_load_with_required_keys():
    for path in (REPO / "configs").glob("*.yaml"):
        cfg = config.load(path)
        for dotted in ("run.seed", "model.vocab_size", "model.seq_len", "data.local", "data.remote",
                       "trainer.max_steps", "trainer.global_batch_size", "trainer.micro_batch_size",
                       "trainer.log_every", "trainer.eval_every", "checkpoint.every_steps",
                       "checkpoint.every_seconds"):
            section, key = dotted.split(".")
            assert hasattr(getattr(cfg, section), key), f"{path.name}: {dotted}"


def test_overrides_are_typed_and_applied():
    cfg = config.load(TINY, ["trainer.max_steps=7", "trainer.lr=1e-3", "data.local=/x", "data.remote=null"])
    assert cfg.trainer.max_steps == 7 and cfg.trainer.lr == 1e-3
    assert cfg.data.local == "/x" and cfg.data.remote is None


@pytest.mark.parametrize("overrides,fragment", [
    (["trainer.max_stepz=3"], "trainer.max_stepz: unknown key (did you mean 'max_steps'?)"),
    (["trainr.max_steps=3"], "trainr: unknown section (did you mean 'trainer'?)"),
    (["trainer.max_steps=many"], "trainer.max_steps: expected int"),
    (["trainer.max_steps=0"], "trainer.max_steps: must be at least 1"),
    (["trainer.lr=-1"], "trainer.lr: must be positive"),
    (["trainer.global_batch_size=10", "trainer.micro_batch_size=4"], "not divisible by trainer.micro_batch_size"),
    (["model.d_model=100", "model.n_head=3"], "model.d_model"),
    (["data.remote=s3://bucket/x"], "data.local: must be set when data.remote is set"),
    (["max_steps=3"], "overrides look like section.key=value"),
    (["data.streams=[{local: /a, weight: 1}]"], "data.streams[0].weight: unknown key"),
    (["data.streams=[{local: /a, proportion: many}]"], "data.streams[0].proportion: expected float"),
    (["data.streams=/a"], "data.streams: expected list"),
    (["data.streams=[{remote: s3://b/x}]"], "data.streams[0].local: must be set"),
    (["data.streams=[{local: /a, proportion: 1, repeat: 2}]"], "set at most one of proportion, repeat and choose"),
    (["data.streams=[{local: /a, proportion: 1}, {local: /b}]"], "give every stream a proportion, or none"),
    (["data.streams=[{local: /a}]", "data.local=/b"], "data.streams: replaces data.local and data.remote"),
    (["data.local=/a", "data.cache_limit=50gb"], "data.cache_limit: applies to the cache of remote data only"),
    (["data.local=/a", "data.remote=/r", "data.cache_limit=lots"], "data.cache_limit: 'lots' is not a size"),
    (["data.validate_hash=crc"], "data.validate_hash: must be unset or a hash streaming knows"),
    (["trainer.device=tpu"], "trainer.device: must be auto, cpu, cuda or mps"),
    (["trainer.precision=fp16"], "trainer.precision: must be auto, bf16 or fp32"),
    (["trainer.compile=maybe"], "trainer.compile: must be auto, true or false"),
    (["trainer.compile=1"], "trainer.compile: must be auto, true or false"),
    (["trainer.activation_checkpointing=auto"], "trainer.activation_checkpointing: expected bool"),
])
def test_bad_values_name_the_key_and_the_fix(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        config.load(TINY, overrides)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_streams_are_typed_dataclasses():
    cfg = config.load(TINY, ["data.streams=[{local: /a, proportion: 3}, {local: /c, remote: s3://b/c, proportion: 1}]"])
    assert [(s.local, s.remote, s.proportion) for s in cfg.data.streams] == [("/a", None, 3.0), ("/c", "s3://b/c", 1.0)]
    cfg = config.load(TINY, ["data.local=/c", "data.remote=gs://b/c", "data.cache_limit=1.5gb"])
    assert config.parse_size(cfg.data.cache_limit) == int(1.5 * 1024**3)


def test_global_batch_must_split_over_the_world():
    cfg = config.load(TINY, ["trainer.global_batch_size=6", "trainer.micro_batch_size=2"])
    assert config.check_world(cfg, 1) == 3
    with pytest.raises(ConfigError, match="micro_batch_size × world size = 2 × 2"):
        config.check_world(cfg, 2)


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  max_steps: 3\n  lr: 0.1\n  max_steps: 5\n")
    with pytest.raises(ConfigError, match=r"line 4: key 'max_steps' is given twice \(first at line 2\); keep one"):
        config.load(path)


def test_a_yaml_syntax_error_keeps_the_parsers_words_and_position(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  max_steps: 3\n lr: [1, 2\n")
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    message = str(caught.value)
    assert "line 3, column 2" in message and "expected <block end>" in message and "\n" not in message
