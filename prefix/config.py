"""Configuration: one dataclass per YAML section, dotted command-line overrides, validation.

Every mistake a user can make here raises `ConfigError` with one line that names the key and
the fix; the entry point turns it into exit code 2. Validation that needs the world size (batch
divisibility) lives in `check_world`, called once the process group is known.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prefix.errors import UserError


class ConfigError(UserError):
    """A configuration value is wrong; the message names the key and the fix."""

    same_on_every_rank = True


@dataclass
class RunConfig:
    seed: int = 1337
    """Seeds model initialisation, the data shuffle (unless data.shuffle_seed is set) and every RNG."""


@dataclass
class StreamConfig:
    """One dataset of a mixture (`data.streams`); at most one of proportion, repeat, choose."""

    local: str | None = None
    """Dataset folder (train/ and val/ splits), or with `remote` the cache of it."""
    remote: str | None = None
    proportion: float | None = None
    """Relative weight in the mixture; streaming normalises the proportions."""
    repeat: float | None = None
    """Draw this many times the stream's samples per epoch (0.5: half of them)."""
    choose: int | None = None
    """Draw exactly this many of the stream's samples per epoch."""


@dataclass
class RopeScaling:
    """Llama 3.1's `llama3` rotary scaling (`model.rope_scaling`): long wavelengths slowed down by
    `factor`, short ones kept, those between interpolated. The defaults are Llama 3.1's values."""

    factor: float = 8.0
    """Wavelengths longer than original_max_position_embeddings / low_freq_factor are this much longer."""
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    """Wavelengths shorter than original_max_position_embeddings / high_freq_factor are left alone."""
    original_max_position_embeddings: int = 8192
    """The context the model was pre-trained with before scaling."""


@dataclass
class DataConfig:
    local: str | None = None
    """Folder of MDS shards (with train/ and val/ splits). Unset: the embedded default corpus."""
    remote: str | None = None
    """Where streaming downloads shards from into `local` (object store URL or folder)."""
    streams: list[StreamConfig] = field(default_factory=list)
    """A mixture of datasets instead of local/remote; recorded in every checkpoint."""
    cache_limit: str | None = None
    """Bound on the local cache of remote data, e.g. 50gb; streaming evicts shards to stay under it."""
    validate_hash: str | None = None
    """Check downloaded shards against index.json with this hash (sha1, xxh64, ...); a bad one stops the run."""
    train_split: str = "train"
    val_split: str = "val"
    num_workers: int = 1
    """DataLoader worker processes per rank for the training stream."""
    shuffle: bool = True
    shuffle_seed: int | None = None
    shuffle_algo: str = "py1e"
    num_canonical_nodes: int = 1
    """Fixed, and stored in the checkpoint: streaming's sample order depends on it."""
    shuffle_block_size: int | None = None
    cache_dir: str | None = None
    """Where the default corpus is built; unset: $PREFIX_CACHE_DIR, else ~/.cache/prefix."""
    val_fraction: float = 0.02
    """Share of documents held out for validation when building the default corpus."""
    record_samples: bool = False
    """Write the dataset index of every sample each step consumed to metrics/samples_rank{r}.jsonl."""


@dataclass
class ModelConfig:
    vocab_size: int = 257
    """Byte-level default: 256 byte ids plus one end-of-document id."""
    seq_len: int = 256
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    mlp_hidden: int | None = None
    """SwiGLU hidden width; unset: 8/3 of d_model rounded up to a multiple of 64."""
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = True
    """The output head shares the token embedding's weight; false: a separate head (most Llama models)."""
    n_kv_head: int | None = None
    """Key/value heads (grouped-query attention); unset: n_head; n_head must be a multiple of it."""
    head_dim: int | None = None
    """Width of one attention head (even, for rotary); unset: d_model / n_head."""
    rope_scaling: RopeScaling | None = None
    """Llama 3.1's `llama3` rotary scaling: {factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings}; unset: plain RoPE."""
    qkv_bias: bool = False
    """Biases on the q, k and v projections (Qwen2's, hence family qwen2 only and always there)."""
    sliding_window: int | None = None
    """Mistral's/Qwen2's attention window, kept for export; must be at least seq_len (it then changes nothing)."""
    family: str = "llama"
    """llama, mistral or qwen2: the Hugging Face architecture prefix export writes and model.init_from reads."""
    init_from: str | None = None
    """A local Hugging Face folder of model.family (config.json + *.safetensors) whose weights a fresh run
    starts from; its shape must match the model.* keys. Ignored when the run resumes from a checkpoint."""


@dataclass
class TrainerConfig:
    max_steps: int = 100
    global_batch_size: int = 16
    """Sequences per optimizer step, across all ranks; kept when the world size changes."""
    micro_batch_size: int = 4
    """Sequences per forward pass on one rank."""
    optimizer: str = "adamw"
    """adamw, or sgd (Nesterov momentum trainer.beta1); weight decay applies to matrices only."""
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    on_nonfinite: str = "skip"
    """A step whose loss or gradient is NaN/inf: skip its update (skip) or stop the run (stop)."""
    max_consecutive_skips: int = 3
    """With on_nonfinite=skip, stop when more steps than this in a row were not finite."""
    log_every: int = 10
    eval_every: int = 50
    """Evaluate every this many steps and at the end; 0 disables evaluation."""
    eval_batches: int = 8
    """Micro-batches of the validation split per rank in one evaluation."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cuda, cpu or mps (Apple silicon; one process)."""
    precision: str = "auto"
    """auto (bf16 autocast on CUDA, fp32 elsewhere), bf16 (autocast; master weights stay fp32) or fp32."""
    compile: bool | str = "auto"
    """torch.compile the model for training: auto (on CUDA only), true or false; checkpoints are the same."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass: less memory, about a third more compute."""
    sample_tokens: int = 0
    """At the end of training, rank 0 generates and logs this many tokens; 0 disables it."""
    sample_prompt: str = "def "
    sample_every: int = 0
    """Every this many steps, rank 0 writes sample_tokens of text per prompt to metrics/samples.jsonl; 0: off."""
    sample_prompts: list[str] = field(default_factory=list)
    """Prompts for the periodic samples; empty: [sample_prompt]."""


@dataclass
class CheckpointConfig:
    every_steps: int = 100
    """Checkpoint every this many steps; 0 disables step-based checkpoints."""
    every_seconds: float | str = 0.0
    """Also checkpoint when this many seconds passed since the last one; 0 disables it; `auto`:
    the Young–Daly interval from the measured save cost and the run's time between preemptions."""
    min_seconds: float = 60
    """`every_seconds: auto` never checkpoints more often than this."""
    max_seconds: float = 1800
    """`every_seconds: auto` never waits longer than this (also its choice before any preemption)."""
    keep_previous: bool = True
    """Keep the previous checkpoint as prev*.pt: the fallback if latest is unusable."""
    asynchronous: bool = True
    """`checkpoint.async`: write periodic checkpoints in a background thread from a snapshot."""


@dataclass
class TelemetryConfig:
    system_every_s: float = 10.0
    """Sample process/host/GPU and network metrics this often (metrics/system.jsonl, network.jsonl); 0: off."""
    all_ranks: bool = False
    """Sample system metrics on every rank (files system_rank{r}.jsonl), not only rank 0."""
    tensorboard: bool = True
    """Also write the metric series as TensorBoard events in tb/ (needs the tensorboard extra)."""
    progress: str = "auto"
    """Rank 0's progress bar: auto (when stderr is a terminal, so never in a pod), always or never."""


@dataclass
class WatchdogConfig:
    timeout_s: float = 600.0
    """No step finished for this long (a stuck collective, a dead peer): dump stacks and exit; 0: off."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {"run": RunConfig, "data": DataConfig, "model": ModelConfig,
                             "trainer": TrainerConfig, "checkpoint": CheckpointConfig,
                             "telemetry": TelemetryConfig, "watchdog": WatchdogConfig}


def _did_you_mean(word: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert `value` to the annotated type, or raise ConfigError naming the key."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        *first, hint = [a for a in args if a is not type(None)]
        for option in first:  # `float | str`: a number if it is one
            try:
                return _coerce(key, value, option)
            except ConfigError:
                pass
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif typing.get_origin(hint) is list:
        if isinstance(value, list):
            return [_coerce(f"{key}[{i}]", item, args[0]) for i, item in enumerate(value)]
    elif dataclasses.is_dataclass(hint):
        if isinstance(value, dict):
            return _fill(hint(), value, key)
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{key}: expected {name}, got {value!r}; set it to a valid {name}")


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a Config from nested plain data, rejecting unknown sections and keys."""
    if not isinstance(raw, dict):
        raise ConfigError("config: the file must hold a mapping of sections (" + ", ".join(SECTIONS) + ")")
    cfg = Config()
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"{section}: unknown section{_did_you_mean(section, SECTIONS)}; "
                              f"valid sections are {', '.join(SECTIONS)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: expected a mapping of keys, got {values!r}")
        _fill(getattr(cfg, section), values, section)
    validate(cfg)
    return cfg


KEYWORD_KEYS = {"async": "asynchronous"}
"""Config keys that are Python keywords, and the fields that hold them."""


def _fill(target: Any, values: dict[str, Any], where: str) -> Any:
    """Set the dataclass `target`'s fields from `values`, rejecting unknown keys."""
    hints = typing.get_type_hints(type(target))
    for key, value in values.items():
        key = KEYWORD_KEYS.get(key, key)
        if key not in hints:
            raise ConfigError(f"{where}.{key}: unknown key{_did_you_mean(key, hints)}; "
                              f"valid keys are {', '.join(hints)}")
        setattr(target, key, _coerce(f"{where}.{key}", value, hints[key]))
    return target


def parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value` → (section, key, value parsed as YAML)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"{text}: overrides look like section.key=value, e.g. trainer.max_steps=100")
    dotted, value = text.split("=", 1)
    section, key = dotted.split(".", 1)
    try:
        parsed = yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError:
        parsed = value
    return section, key, parsed


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(f"{self.name}: line {key_node.start_mark.line + 1}: key {key!r} is given twice "
                                  f"(first at line {seen[key]}); keep one")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> Any:
    """A config file's data; a syntax error keeps the parser's own words and position."""
    text = path.read_text()
    try:
        loader = _StrictLoader(text)
        loader.name = str(path)
        try:
            return loader.get_single_data() or {}
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(filter(None, (getattr(e, "context", None), getattr(e, "problem", None)))) or str(e)
        raise ConfigError(f"{path}: not valid YAML{where} ({problem}); fix the syntax there") from None


def load(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML file (or start from defaults) and apply dotted overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found; pass an existing YAML file to --config")
        raw = read_yaml(path)
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the file must hold a mapping of sections (run, data, model, ...)")
    for text in overrides:
        section, key, value = parse_override(text)
        section_values = raw.setdefault(section, {})
        if not isinstance(section_values, dict):
            raise ConfigError(f"{section}: expected a mapping of keys in the config file")
        section_values[key] = value
    return from_dict(raw)


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
    _require(c.every_seconds == "auto" or (isinstance(c.every_seconds, float) and c.every_seconds >= 0),
             "checkpoint.every_seconds", "must be 0 (off), a number of seconds or auto")
    _require(0 < c.min_seconds <= c.max_seconds, "checkpoint.min_seconds",
             "must be positive and at most checkpoint.max_seconds")
    _require(cfg.telemetry.system_every_s >= 0, "telemetry.system_every_s", "must be 0 (off) or positive")
    _require(cfg.telemetry.progress in ("auto", "always", "never"), "telemetry.progress", "must be auto, always or never")
    _require(cfg.watchdog.timeout_s >= 0, "watchdog.timeout_s", "must be 0 (off) or positive")


_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2, "g": 1024**3, "gb": 1024**3,
          "t": 1024**4, "tb": 1024**4}


def parse_size(text: str | int) -> int | None:
    """Bytes in a size like 50gb, 512mb or 1000 (streaming's notation: powers of 1024), else None."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?b?)\s*", str(text).lower())
    return int(float(match[1]) * _UNITS[match[2]]) if match and match[2] in _UNITS else None


def check_world(cfg: Config, world_size: int) -> int:
    """Return gradient-accumulation steps, or raise if the global batch cannot be split evenly."""
    t = cfg.trainer
    per_step = t.micro_batch_size * world_size
    _require(t.global_batch_size % per_step == 0, "trainer.global_batch_size",
             f"{t.global_batch_size} is not divisible by micro_batch_size × world size = "
             f"{t.micro_batch_size} × {world_size}; change trainer.global_batch_size or trainer.micro_batch_size")
    return t.global_batch_size // per_step
