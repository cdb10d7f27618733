"""A copy of the training state that the step loop can no longer change, for a background write.

The optimizer updates parameters and moments in place, so an asynchronous save must not hold
references to them: every tensor is copied to CPU memory first. On a GPU the copies go to pinned
buffers, reused from one save to the next (at most one write is in flight), as non-blocking copies
on the current stream: later kernels that update the same tensors are queued behind them, so the
loop does not wait; the writer thread waits for `ready` before it reads a byte.
"""

from __future__ import annotations

import copy
from typing import Any

import torch


class Snapshot:
    """Copies nested state dicts; keeps the pinned buffers of a GPU run for the next save."""

    def __init__(self) -> None:
        self._pinned: dict[str, torch.Tensor] = {}
        self.ready: torch.cuda.Event | None = None

    def take(self, state: dict[str, Any]) -> dict[str, Any]:
        """A deep copy of `state` with every tensor on the CPU; call `wait()` before reading it."""
        self.ready = None
        copied = self._copy(state, "")
        if self.ready is not None:
            self.ready.record()
        return copied

    def wait(self) -> None:
        if self.ready is not None:
            self.ready.synchronize()

    def _copy(self, value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            return self._tensor(value.detach(), path)
        if isinstance(value, dict):
            return {k: self._copy(v, f"{path}/{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            items = [self._copy(v, f"{path}/{i}") for i, v in enumerate(value)]
            return items if isinstance(value, list) else tuple(items)
        return copy.deepcopy(value)

    def _tensor(self, t: torch.Tensor, path: str) -> torch.Tensor:
        if t.device.type != "cuda":
            return t.clone()
        buffer = self._pinned.get(path)
        if buffer is None or buffer.shape != t.shape or buffer.dtype != t.dtype:
            buffer = self._pinned[path] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        buffer.copy_(t, non_blocking=True)
        if self.ready is None:
            self.ready = torch.cuda.Event()
        return buffer
