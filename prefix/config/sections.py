"""The configuration's schema: one dataclass per YAML section, every key with its default and a doc.

The string under each field is its documentation: `prefix train --print-config` prints it beside
the key (prefix/config/doc.py reads this file's source), so keep each one a sentence that says why.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunConfig:
    seed: int = 1337
    """Seeds model initialisation, the data shuffle (unless data.shuffle_seed is set) and every RNG."""
    lease_timeout_s: float = 30.0
    """One writer per run: a start holds a lease on the run directory, renewed every sixth of this; a lease
    not renewed for this long is taken over (what a start after a SIGKILL on another host waits, docs/lease.md)."""


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
    parallelism: str = "ddp"
    """ddp (every rank holds the whole model) or fsdp (FSDP2: weights, gradients and optimizer state
    sharded over the ranks, sharded checkpoints; for models that do not fit one GPU, docs/scale.md)."""
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
    keep_every_steps: int = 0
    """Also save every N-th step and keep it as checkpoints/step-<N>/ (hard links; never rotated); 0: off."""
    asynchronous: bool = True
    """`checkpoint.async`: write periodic checkpoints in a background thread from a snapshot; a save due while
    the previous write is in flight is skipped (the next boundary after that write's commit saves instead)."""
    checksum: str = "xxh3"
    """The checksum of every checkpoint file in its manifest: xxh3 (XXH3-128, ~10 GB/s) or sha256; a manifest
    names its algorithm, so checkpoints written with either (or by older versions: SHA-256) verify."""
    remote: str | None = None
    """Also upload every committed checkpoint, in the background, to s3://bucket/prefix (gs://, oci:// or a path)
    under <run name>/; a start whose volume holds no usable checkpoint resumes from there. Unset: off."""
    remote_timeout_s: float = 60.0
    """A start that needs checkpoint.remote retries an unreachable one this long, then exits 2."""


@dataclass
class WandbConfig:
    project: str | None = None
    """Log to Weights & Biases in this project (needs the wandb extra); unset: off."""
    entity: str | None = None
    """The W&B team or user; unset: your default entity."""
    mode: str = "online"
    """online, offline (files in wandb/ under the run directory, `wandb sync` later) or disabled."""
    group: str | None = None
    """Group W&B runs (e.g. a sweep); unset: the run's experiment."""


@dataclass
class MlflowConfig:
    tracking_uri: str | None = None
    """Log to the MLflow tracking server at this URI (needs the mlflow extra); unset: off."""
    experiment: str | None = None
    """The MLflow experiment; unset: the run's experiment (the config file's name or --experiment)."""


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
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


@dataclass
class WatchdogConfig:
    timeout_s: float = 600.0
    """No step finished for this long (a stuck collective, a dead peer): dump stacks and exit; 0: off."""


@dataclass
class DistributedConfig:
    timeout_s: float = 300.0
    """A collective (or the process group's store) waiting this long for a peer ends the start with exit 124,
    so a frozen or lost peer costs minutes, not the 600 s default; must cover the slowest checkpoint write."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {"run": RunConfig, "data": DataConfig, "model": ModelConfig,
                             "trainer": TrainerConfig, "checkpoint": CheckpointConfig,
                             "telemetry": TelemetryConfig, "watchdog": WatchdogConfig,
                             "distributed": DistributedConfig}
