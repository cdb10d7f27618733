"""Validation: values that are wrong whatever the world size (`validate`), and those that depend on
it (`check_world`, called once the process group is known). Each mistake is one `ConfigError` line
naming the key and the fix; entry points turn it into exit code 2.
"""

from __future__ import annotations

import re
from urllib.parse import urlparse

from prefix.config.sections import Config
from prefix.errors import UserError


class ConfigError(UserError):
    """A configuration value is wrong; the message names the key and the fix."""

    same_on_every_rank = True



REMOTE_SCHEMES = ("s3", "gs", "oci")
"""checkpoint.remote: the object stores mosaicml-streaming 0.13 can upload to, list and download from (and paths)."""
UNLISTED_SCHEMES = ("hf", "azure", "azure-dl", "dbfs", "alipan", "sftp")
"""streaming knows these, but cannot list them: a start could not find its checkpoints there."""


def _remote_problem(url: str) -> str:
    """Why `url` cannot be checkpoint.remote ("" when it can)."""
    scheme = urlparse(url).scheme
    if scheme in REMOTE_SCHEMES or (not scheme and url.strip()):
        return ""
    if not scheme:
        return "must be unset or a URL such as s3://bucket/prefix"
    known = "mosaicml-streaming 0.13 cannot list" if scheme in UNLISTED_SCHEMES else "mosaicml-streaming does not know"
    return (f"{known} {scheme}:// (a start lists the remote to find its checkpoints); use s3:// (any S3-compatible "
            "store, with S3_ENDPOINT_URL), gs://, oci:// or a local path")


def _require(ok: bool, key: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {fix}")


def validate(cfg: Config) -> None:
    """Check values that are wrong whatever the world size."""
    m, t, d, c = cfg.model, cfg.trainer, cfg.data, cfg.checkpoint
    _require(m.vocab_size >= 2, "model.vocab_size", "must be at least 2")
    _require(m.seq_len >= 2, "model.seq_len", "must be at least 2")
    _require(m.n_layer >= 1, "model.n_layer", "must be at least 1")
    _require(m.n_head >= 1, "model.n_head", "must be at least 1")
    _require(m.head_dim is not None or m.d_model % m.n_head == 0, "model.d_model",
             f"{m.d_model} is not divisible by model.n_head={m.n_head}; pick a multiple, or set model.head_dim")
    _require(m.head_dim is not None or (m.d_model // m.n_head) % 2 == 0, "model.d_model",
             "d_model / n_head must be even for rotary embeddings")
    _require(m.head_dim is None or (m.head_dim >= 2 and m.head_dim % 2 == 0), "model.head_dim",
             "must be even (rotary embeddings rotate pairs) and positive, or unset")
    _require(m.n_kv_head is None or (m.n_kv_head >= 1 and m.n_head % m.n_kv_head == 0), "model.n_kv_head",
             f"must divide model.n_head={m.n_head} (each key/value head serves n_head / n_kv_head heads), or be unset")
    if (r := m.rope_scaling) is not None:
        _require(r.factor >= 1 and 0 < r.low_freq_factor < r.high_freq_factor
                 and r.original_max_position_embeddings >= 1, "model.rope_scaling",
                 "needs factor >= 1, 0 < low_freq_factor < high_freq_factor and "
                 "original_max_position_embeddings >= 1 (Llama 3.1: 8, 1, 4, 8192)")
    _require(m.family in ("llama", "mistral", "qwen2"), "model.family", "must be llama, mistral or qwen2")
    _require(m.qkv_bias == (m.family == "qwen2"), "model.qkv_bias",
             "must be true for family qwen2 and false for llama and mistral (their q/k/v projections have no bias)")
    _require(m.sliding_window is None or m.family in ("mistral", "qwen2"), "model.sliding_window",
             "applies to family mistral or qwen2 only; unset it")
    _require(m.sliding_window is None or m.sliding_window >= m.seq_len, "model.sliding_window",
             f"{m.sliding_window} is shorter than model.seq_len={m.seq_len} and prefix has no windowed attention; "
             "lower model.seq_len to it at most")
    _require(m.mlp_hidden is None or m.mlp_hidden >= 1, "model.mlp_hidden", "must be positive or unset")
    _require(m.rope_theta > 0, "model.rope_theta", "must be positive")
    _require(t.max_steps >= 1, "trainer.max_steps", "must be at least 1")
    _require(t.micro_batch_size >= 1, "trainer.micro_batch_size", "must be at least 1")
    _require(t.global_batch_size >= 1, "trainer.global_batch_size", "must be at least 1")
    _require(t.global_batch_size % t.micro_batch_size == 0, "trainer.global_batch_size",
             f"{t.global_batch_size} is not divisible by trainer.micro_batch_size={t.micro_batch_size}; "
             "make it a multiple")
    _require(t.lr > 0, "trainer.lr", "must be positive")
    _require(0 <= t.min_lr <= t.lr, "trainer.min_lr", "must be between 0 and trainer.lr")
    _require(t.warmup_steps >= 0, "trainer.warmup_steps", "must be 0 or more")
    _require(t.weight_decay >= 0, "trainer.weight_decay", "must be 0 or more")
    _require(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "trainer.beta1/beta2", "must be in [0, 1)")
    _require(t.grad_clip >= 0, "trainer.grad_clip", "must be 0 (off) or positive")
    _require(t.optimizer in ("adamw", "sgd"), "trainer.optimizer", "must be adamw or sgd")
    _require(t.on_nonfinite in ("skip", "stop"), "trainer.on_nonfinite", "must be skip or stop")
    _require(t.max_consecutive_skips >= 0, "trainer.max_consecutive_skips", "must be 0 or more")
    _require(t.log_every >= 1, "trainer.log_every", "must be at least 1")
    _require(t.eval_every >= 0, "trainer.eval_every", "must be 0 (off) or positive")
    _require(t.eval_batches >= 1, "trainer.eval_batches", "must be at least 1")
    _require(t.device in ("auto", "cpu", "cuda", "mps"), "trainer.device", "must be auto, cpu, cuda or mps")
    _require(t.parallelism in ("ddp", "fsdp"), "trainer.parallelism", "must be ddp or fsdp")
    _require(t.parallelism == "ddp" or t.device != "mps", "trainer.parallelism",
             "fsdp needs cpu or cuda devices (mps runs one process); use trainer.parallelism=ddp")
    _require(t.precision in ("auto", "bf16", "fp32"), "trainer.precision", "must be auto, bf16 or fp32")
    _require(isinstance(t.compile, bool) or t.compile == "auto", "trainer.compile", "must be auto, true or false")
    _require(t.sample_tokens >= 0, "trainer.sample_tokens", "must be 0 (off) or positive")
    _require(t.sample_every >= 0, "trainer.sample_every", "must be 0 (off) or positive")
    _require(not t.sample_every or t.sample_tokens, "trainer.sample_every", "needs trainer.sample_tokens > 0")
    _require(d.num_workers >= 0, "data.num_workers", "must be 0 or more")
    _require(d.num_canonical_nodes >= 1, "data.num_canonical_nodes", "must be at least 1")
    _require(d.shuffle_algo in ("py1e", "py1br", "py1b", "py1s", "py2s", "naive"), "data.shuffle_algo",
             "must be one of py1e, py1br, py1b, py1s, py2s, naive")
    _require(0 < d.val_fraction < 1, "data.val_fraction", "must be between 0 and 1")
    _require(d.remote is None or d.local is not None, "data.local",
             "must be set when data.remote is set (it is the local cache of the remote)")
    _require(not (d.streams and (d.local or d.remote)), "data.streams",
             "replaces data.local and data.remote; move them into the streams list")
    for i, s in enumerate(d.streams):
        key = f"data.streams[{i}]"
        _require(s.local is not None, f"{key}.local", "must be set (the dataset folder, or the cache of its remote)")
        weights = [w for w in (s.proportion, s.repeat, s.choose) if w is not None]
        _require(len(weights) <= 1, key, "set at most one of proportion, repeat and choose")
        _require(all(w >= 0 for w in weights), key, "proportion, repeat and choose must be 0 or more")
    if d.streams:
        given = [s.proportion is not None for s in d.streams]
        _require(all(given) or not any(given), "data.streams",
                 "give every stream a proportion, or none (then use repeat/choose, or neither)")
    remotes = [s.remote for s in d.streams] if d.streams else [d.remote]
    _require(d.cache_limit is None or all(remotes), "data.cache_limit",
             "applies to the cache of remote data only (streaming would delete local-only shards); "
             "unset it or give every dataset a remote")
    _require(d.cache_limit is None or parse_size(d.cache_limit) is not None, "data.cache_limit",
             f"{d.cache_limit!r} is not a size; write it like 50gb, 512mb or a number of bytes")
    _require(d.validate_hash in (None, "sha1", "sha224", "sha256", "sha384", "sha512", "sha3_224", "sha3_256",
                                 "sha3_384", "sha3_512", "md5", "xxh32", "xxh64", "xxh128", "xxh3_64",
                                 "xxh3_128"),
             "data.validate_hash", "must be unset or a hash streaming knows, e.g. sha1 or xxh64")
    _require(c.every_steps >= 0, "checkpoint.every_steps", "must be 0 (off) or positive")
    _require(c.keep_every_steps >= 0, "checkpoint.keep_every_steps", "must be 0 (off) or positive")
    _require(c.checksum in ("xxh3", "sha256"), "checkpoint.checksum", "must be xxh3 or sha256")
    _require(c.remote is None or not _remote_problem(c.remote), "checkpoint.remote", _remote_problem(c.remote or ""))
    _require(c.remote is None or 0 < c.remote_timeout_s <= cfg.distributed.timeout_s / 2, "checkpoint.remote_timeout_s",
             f"must be positive and at most half of distributed.timeout_s ({cfg.distributed.timeout_s:g} s: the other "
             "ranks wait while rank 0 reads the remote)")
    _require(c.every_seconds == "auto" or (isinstance(c.every_seconds, float) and c.every_seconds >= 0),
             "checkpoint.every_seconds", "must be 0 (off), a number of seconds or auto")
    _require(0 < c.min_seconds <= c.max_seconds, "checkpoint.min_seconds",
             "must be positive and at most checkpoint.max_seconds")
    _require(cfg.telemetry.system_every_s >= 0, "telemetry.system_every_s", "must be 0 (off) or positive")
    _require(cfg.telemetry.progress in ("auto", "always", "never"), "telemetry.progress", "must be auto, always or never")
    _require(cfg.telemetry.wandb.mode in ("online", "offline", "disabled"), "telemetry.wandb.mode",
             "must be online, offline or disabled")
    _require(cfg.watchdog.timeout_s >= 0, "watchdog.timeout_s", "must be 0 (off) or positive")
    _require(cfg.run.lease_timeout_s >= 1, "run.lease_timeout_s", "must be at least 1 second")
    _require(cfg.distributed.timeout_s >= 2 * cfg.run.lease_timeout_s + 10, "distributed.timeout_s",
             f"must be at least 2 × run.lease_timeout_s + 10 s = {2 * cfg.run.lease_timeout_s + 10:g} (the other "
             "ranks wait that long while rank 0 waits for the run's lease); raise it or lower run.lease_timeout_s")


_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2, "g": 1024**3, "gb": 1024**3,
          "t": 1024**4, "tb": 1024**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_size(text: str | int) -> int | None:
    """Bytes in a size like 50gb, 512mb, 80GiB or 1000 (streaming's notation: powers of 1024, any case), else None."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*", str(text).lower())
    return int(float(match[1]) * _UNITS[match[2]]) if match and match[2] in _UNITS else None


def check_world(cfg: Config, world_size: int) -> int:
    """Return gradient-accumulation steps, or raise if the global batch cannot be split evenly."""
    t = cfg.trainer
    per_step = t.micro_batch_size * world_size
    _require(t.global_batch_size % per_step == 0, "trainer.global_batch_size",
             f"{t.global_batch_size} is not divisible by micro_batch_size × world size = "
             f"{t.micro_batch_size} × {world_size}; change trainer.global_batch_size or trainer.micro_batch_size")
    return t.global_batch_size // per_step
