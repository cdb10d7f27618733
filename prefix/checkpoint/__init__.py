"""Checkpoints: what they hold, how they are written so that no crash or full disk loses one,
and which one a start resumes from. See docs/checkpoints.md.

- `files`: names, checksummed durable writes, manifests; `checksums`: XXH3-128 or SHA-256, per file;
- `resume`: verifying files and choosing the step to resume from;
- `checkpointer`: the collective save protocol and loading; `policy`: save, skip or commit at a boundary;
- `snapshot`, `background`: the asynchronous save's copy of the state, and its low-priority writer thread;
- `sharded`: trainer.parallelism=fsdp's DCP folders (written fresh per save, verified whole, read safely);
- `history`: `checkpoint.keep_every_steps`'s kept steps, `step-<N>/` (hard links, never rotated);
- `remote`, `remote_upload`, `remote_store`: `checkpoint.remote`: the restore of a volume with nothing usable,
  the background upload of every commit, and the transport (mosaicml-streaming's object stores);
- `rng`: every RNG state, in a form `weights_only` loading accepts.
"""

from prefix.checkpoint.checkpointer import Checkpointer, SaveResult
from prefix.checkpoint.files import FORMAT_VERSION, global_name, rank_name
from prefix.checkpoint.resume import Finding, NoUsableCheckpoint, Resume, choose, log_findings
from prefix.checkpoint.rng import rng_state, set_rng_state

__all__ = ["FORMAT_VERSION", "Checkpointer", "Finding", "NoUsableCheckpoint", "Resume", "SaveResult", "choose",
           "global_name", "log_findings", "rank_name", "rng_state", "set_rng_state"]
