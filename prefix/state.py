"""TrainState: the one definition of what a run's global checkpoint (`latest.pt`) holds.

The trainer builds one to save and restores from one; every tool, test and benchmark reads a
checkpoint through it (`TrainState.load`, `read_verified`) instead of indexing the dict by hand.
The file itself stays a plain dict of tensors and plain types, loadable with
`torch.load(path, weights_only=True)` (the contract in DESIGN.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefix.errors import UserError


@dataclass(frozen=True)
class TrainState:
    model: dict[str, Any] | None
    """State dict of the unwrapped model (no DDP or compile prefixes); None in a sharded checkpoint's file
    (`read_verified` fills it from the folder)."""
    optimizer: dict[str, Any] | None
    """None in a sharded checkpoint's file."""
    scheduler: dict[str, Any]
    step: int
    """Optimizer steps done."""
    tokens_seen: int
    config: dict[str, Any]
    """The resolved config, plain types (`config.from_dict` rebuilds it)."""
    dataloader: dict[str, Any] | None = None
    """StreamingDataLoader state, with the dataset versions it read."""
    skipped_steps: int = 0
    """Updates skipped for a non-finite loss, over the whole run."""
    format_version: int | None = None
    """Stamped by the checkpointer when the file is written."""
    sharded: str | None = None
    """trainer.parallelism=fsdp: the folder (in checkpoints/) of the sharded model and optimizer, which
    `model` and `optimizer` (None in the file) then come from; stamped by the checkpointer."""

    def to_dict(self) -> dict[str, Any]:
        """What the checkpointer saves (`format_version` and `sharded` are its to stamp)."""
        state = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        state.pop("format_version")
        state.pop("sharded")
        return state

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> TrainState:
        """A loaded checkpoint; keys of newer formats are ignored, missing optional ones defaulted."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in state.items() if k in names}
        return cls(**{**values, "step": int(values["step"]), "tokens_seen": int(values["tokens_seen"]),
                      "skipped_steps": int(values.get("skipped_steps") or 0)})

    @classmethod
    def load(cls, path: Path) -> TrainState:
        """Read a global checkpoint file on the CPU; anything else (a pickle that runs code, a rank
        file, garbage) is a UserError naming the file."""
        import torch

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 (a pickle that runs code, a truncated zip, garbage: torch raises several)
            raise UserError(f"{path}: does not load as a checkpoint ({type(e).__name__}); pass another "
                            "checkpoint") from None
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        if not isinstance(state, dict) or not required <= state.keys():
            raise UserError(f"{path}: not a global checkpoint (latest.pt / prev.pt); pass one of those")
        return cls.from_dict(state)

    def model_config(self):
        """The run's ModelConfig, as the checkpoint recorded it."""
        from prefix import config

        return config.from_dict(self.config).model


def read_verified(folder: Path, which: str = "latest") -> tuple[TrainState, str]:
    """The checkpoint a tool reads from a run's checkpoints/, verified like a resume verifies it.

    which: `latest` (the newest usable step, as a resume picks it, falling back to prev), `prev`
    (only if a manifest lists its checksum) or a file path (read unverified). Returns the state and
    the file's name.
    """
    from prefix.checkpoint import choose, global_name
    from prefix.checkpoint.files import FORMAT_VERSION, read_manifests

    run = folder.parent
    if which == "latest":
        if not folder.is_dir():
            raise UserError(f"{run}: no such run (checkpoints/ missing); check the name and --runs-root")
        choice, _ = choose(folder, world_size=1)  # raises NoUsableCheckpoint, a UserError
        if choice is None:
            raise UserError(f"{run}: no checkpoint yet; wait for the first one (checkpoint.every_steps)")
        path = folder / global_name(choice.global_slot)
    elif which == "prev":
        path = folder / global_name("prev")
        if not path.is_file():
            raise UserError(f"{path}: no previous checkpoint; read latest, or pass --checkpoint PATH")
        if not any(m.verifies("global", path) for m in read_manifests(folder)[0]):
            raise UserError(f"{path}: no manifest lists its checksum (damaged or unverifiable); "
                            "read latest, or pass its path to --checkpoint to read it unverified")
    else:
        path = Path(which).expanduser()
        if not path.is_file():
            raise UserError(f"--checkpoint {which}: no such file; pass latest, prev or a checkpoint's path")
    state = TrainState.load(path)
    if state.format_version not in (None, FORMAT_VERSION):
        raise UserError(f"{path}: written in checkpoint format {state.format_version}; this prefix "
                        f"reads format {FORMAT_VERSION}")
    if state.sharded:
        state = dataclasses.replace(state, model=whole_model(path.parent / state.sharded, state.model_config()))
    return state, path.name


def whole_model(folder: Path, model_config) -> dict[str, Any]:
    """The model's weights, whole, from a sharded checkpoint's folder, read in this one process (for
    export, sample and comparisons; the optimizer's state stays on disk)."""
    import torch

    from prefix.checkpoint import sharded
    from prefix.model import GPT

    with torch.device("meta"):
        shapes = GPT(model_config).state_dict()
    target = {"model": {k: torch.empty(v.shape, dtype=v.dtype) for k, v in shapes.items()}}
    try:
        sharded.read(folder, target)
    except Exception as e:  # noqa: BLE001 (DCP raises CheckpointException, pickle and OS errors)
        raise UserError(f"{folder}: the sharded checkpoint does not load ({str(e).splitlines()[0][:200]}); "
                        "read latest (verified), or restore the folder") from None
    return target["model"]
