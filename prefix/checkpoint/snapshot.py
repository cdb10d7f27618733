"""A copy of the training state that the step loop can no longer change, for a background write.

The optimizer updates parameters and moments in place, so an asynchronous save must not write
from them: every tensor is copied into a buffer of the snapshot's own, reused from one save to
the next (at most one write is in flight). Nothing changes those tensors between a checkpoint
and the next optimizer step (forward and backward only read them), so the copies need not stall
the loop (the pipelined snapshot of CheckFreq, Mohan et al., FAST '21):
- CPU tensors are copied by the writer thread (`fill`) while the next step's forward and backward
  run; the loop calls `fence()` before it updates them, which waits only if the copy is not done;
- GPU tensors are copied at `take` into pinned buffers, non-blocking, on the current stream:
  later kernels that update them are queued behind the copies; `fill` waits for them;
- tensors on other devices (mps) are copied at `take`.
Non-tensor values (step, scheduler, loader position, config) are deep-copied at `take`.
Tensors that share memory (tied embeddings) share one buffer, so the file holds them once. A sharded
tensor (DTensor) is copied as its local shard, rewrapped with its place in the whole.
"""

from __future__ import annotations

import copy
import threading
import time
from typing import Any

import torch

from prefix.distributed import dtensor_type

_IMMUTABLE = (int, float, str, bool, bytes)
"""Values a snapshot can share with the live state instead of copying."""


class Snapshot:
    """Copies nested state dicts into buffers kept for the next save."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._wrapped: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # path → (buffer, the DTensor over it)
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (buffer, live CPU tensor) to copy
        self._gpu_copied: torch.cuda.Event | None = None
        self._copied = threading.Event()
        self._copied.set()
        self._dtensor: type | tuple = ()  # DTensor, when something imported it (this take's)

    def take(self, state: dict[str, Any]) -> dict[str, Any]:
        """`state`'s structure over the snapshot's buffers; readable once `fill()` has returned."""
        self._copied.clear()
        self._pending, self._gpu_copied, self._dtensor = [], None, dtensor_type() or ()
        structure = self._copy(state, "", seen={})
        if self._gpu_copied is not None:
            self._gpu_copied.record()
        return structure

    def fill(self) -> None:
        """Make the CPU copies (in the writer thread); then wait for the GPU's."""
        try:
            for buffer, live in self._pending:
                buffer.copy_(live)
        finally:
            self._pending = []
            self._copied.set()  # also on an error: the loop must not wait forever (the error is raised there)
        if self._gpu_copied is not None:
            self._gpu_copied.synchronize()

    def fence(self) -> float:
        """Before the state is updated in place: wait for `fill`'s copies; the seconds waited."""
        if self._copied.is_set():
            return 0.0
        begin = time.monotonic()
        self._copied.wait()
        return time.monotonic() - begin

    def _copy(self, value: Any, path: str, seen: dict[tuple, torch.Tensor]) -> Any:
        """`seen`: this take's buffers by the memory they copy. Runs on the step loop: every save, hundreds of
        values (a save every step is the case to make cheap)."""
        if value is None or type(value) in _IMMUTABLE:
            return value
        if isinstance(value, self._dtensor):  # a shard (FSDP): copy this rank's part, and where it sits
            local = self._tensor(value.to_local().detach(), path, seen)
            wrapped = self._wrapped.get(path)
            if wrapped is None or wrapped[0] is not local:  # rewrapping costs ~0.1 ms a tensor: once per buffer
                self._wrapped[path] = (local, type(value).from_local(
                    local, value.device_mesh, value.placements, run_check=False, shape=value.shape,
                    stride=value.stride()))
            return self._wrapped[path][1]
        if isinstance(value, torch.Tensor):
            return self._tensor(value.detach() if value.requires_grad else value, path, seen)
        if isinstance(value, dict):
            return {k: self._copy(v, f"{path}/{k}", seen) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            items = [self._copy(v, f"{path}/{i}", seen) for i, v in enumerate(value)]
            return items if isinstance(value, list) else tuple(items)
        return copy.deepcopy(value)

    def _tensor(self, t: torch.Tensor, path: str, seen: dict[tuple, torch.Tensor]) -> torch.Tensor:
        memory = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype)
        if memory in seen:
            return seen[memory]
        kind = t.device.type
        buffer = self._buffers.get(path)
        if buffer is None or buffer.shape != t.shape or buffer.dtype != t.dtype:
            buffer = self._buffers[path] = torch.empty(t.shape, dtype=t.dtype, pin_memory=kind == "cuda")
        if kind == "cpu":
            self._pending.append((buffer, t))
        elif kind == "cuda":
            buffer.copy_(t, non_blocking=True)
            if self._gpu_copied is None:
                self._gpu_copied = torch.cuda.Event()
        else:  # mps and others: copied now, on the loop's thread
            buffer.copy_(t)
        seen[memory] = buffer
        return buffer
