"""Config changes between a checkpoint and the start that resumes it.

Some changes silently corrupt a run: the checkpoint's weights no longer fit the model, or the data
order, the RNG streams or the optimizer's meaning change under it. Those are refused unless the
user asks for them on purpose (`--allow-config-change`). Everything else (run length, intervals,
evaluation, workers, learning rate...) is accepted; every change is recorded in the restart history.
"""

from __future__ import annotations

from typing import Any

from prefix.errors import UserError

PROTECTED = (
    "run.seed",
    "model.vocab_size", "model.seq_len", "model.n_layer", "model.n_head", "model.d_model", "model.mlp_hidden",
    "model.rope_theta", "model.norm_eps", "model.tie_embeddings", "model.n_kv_head", "model.head_dim",
    "model.rope_scaling", "model.qkv_bias",
    "data.local", "data.remote", "data.streams", "data.train_split", "data.shuffle", "data.shuffle_seed", "data.shuffle_algo",
    "data.num_canonical_nodes", "data.shuffle_block_size",
    "trainer.global_batch_size", "trainer.optimizer",
)
"""Model shape and tokenizer, dataset and its order, seed, global batch, optimizer kind. model.family and
model.sliding_window are free: the family fixes qkv_bias (protected) and otherwise only names the export's
architecture, and a window is never shorter than seq_len, so neither changes what the weights compute."""


class ConfigDrift(UserError):
    same_on_every_rank = True


def _flatten(cfg: dict[str, Any]) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in cfg.items() for key, value in values.items()}


def changes(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, list[Any]]:
    """{"section.key": [saved, now]} for every key whose value differs (keys new since then are skipped)."""
    old, new = _flatten(saved), _flatten(now)
    return {key: [old[key], value] for key, value in new.items() if key in old and old[key] != value}


def check(saved: dict[str, Any], now: dict[str, Any], step: int, allow: bool) -> dict[str, list[Any]]:
    """The changes to record; raises if one would corrupt the run and `allow` is not set."""
    diff = changes(saved, now)
    # With a remote, data.local is only where its cache lives: a pod on another node may move it.
    refused = [key for key in PROTECTED if key in diff and not (key == "data.local" and now["data"]["remote"])]
    if refused and not allow:
        listed = ", ".join(f"{key} {diff[key][0]!r} → {diff[key][1]!r}" for key in refused)
        raise ConfigDrift(f"config: resuming the checkpoint of step {step} with {listed} would corrupt the run; "
                          "restore those values, start a new --run-name, or pass --allow-config-change "
                          "to resume with them on purpose")
    return diff


def check_data_versions(saved: list[str | None] | None, now: list[str | None], step: int, allow: bool) -> None:
    """A remote dataset rewritten since the checkpoint would be read in another order: refuse it."""
    if saved is None or saved == now or allow:
        return
    raise ConfigDrift(f"data.remote: the dataset changed since the checkpoint of step {step} (version "
                      f"{saved} → {now}); restore it, start a new --run-name, or pass --allow-config-change "
                      "to go on with the new data")


def finished(step: int, max_steps: int, diff: dict[str, list[Any]]) -> str:
    """What a start of a finished run says: what changed since its last checkpoint, and how to go on."""
    changed = "; config changes since: " + ", ".join(f"{k} {a!r} → {b!r}" for k, (a, b) in diff.items()) \
        if diff else ""
    return (f"run already finished at step {step} (trainer.max_steps={max_steps}); nothing to do{changed}; "
            f"to train further pass trainer.max_steps=<more than {step}>, or start a new --run-name")
