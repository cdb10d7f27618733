"""An asynchronous save writes the state as it was at its step, though the copy is made later.

The snapshot's CPU copies are made by the writer thread while the loop goes on; the loop calls
`before_update` before it changes the state in place. These tests change the state right after
that call, while a large copy would still be running without it.
"""

from __future__ import annotations

import threading

import pytest
import torch

from prefix.checkpoint import Checkpointer, choose
from prefix.checkpoint.snapshot import Snapshot
from prefix.config import CheckpointConfig
from prefix.distributed import World

BIG = 32 * 2**20  # floats: 128 MB, tens of milliseconds to copy


def test_a_save_in_flight_holds_the_state_of_its_step_though_the_loop_updates_it(tmp_path):
    ck = Checkpointer(tmp_path, World(rank=0, world_size=1), CheckpointConfig())
    weight, moment = torch.zeros(BIG), torch.ones(8)
    ck.start(1, lambda: {"model": {"w": weight}, "optimizer": {"m": moment}, "step": 1}, {"rng": torch.zeros(3)})
    ck.before_update()
    weight.add_(1.0)  # the optimizer step right after the checkpoint
    moment.mul_(5.0)
    result = ck.finish()
    assert result.error is None and result.background
    choice, _ = choose(tmp_path, 1)
    state, _ = ck.load(choice)
    assert choice.step == 1
    assert torch.count_nonzero(state["model"]["w"]) == 0, "the update leaked into the checkpoint"
    assert torch.equal(state["optimizer"]["m"], torch.ones(8))


def test_fence_waits_for_the_copy_and_reports_the_wait():
    snapshot, live = Snapshot(), torch.arange(10.0)
    copied = snapshot.take({"x": live})
    filler = threading.Timer(0.2, snapshot.fill)
    filler.start()
    waited = snapshot.fence()
    assert waited > 0.1
    live.zero_()
    assert torch.equal(copied["x"], torch.arange(10.0))
    assert snapshot.fence() == 0.0  # nothing in flight: no wait
    filler.join()


def test_buffers_are_reused_and_shared_memory_is_copied_once():
    snapshot, weight = Snapshot(), torch.randn(4, 4)
    state = {"wte": weight.detach(), "lm_head": weight.detach(), "other": torch.randn(4)}  # tied embeddings
    first = snapshot.take(state)
    snapshot.fill()
    assert first["wte"] is first["lm_head"], "tied tensors would be written twice"
    second = snapshot.take(state)
    snapshot.fill()
    assert second["wte"] is first["wte"] and second["other"] is first["other"], "a new buffer per save"
    assert torch.equal(second["wte"], weight)


def test_a_failed_copy_releases_the_loop(monkeypatch):
    snapshot = Snapshot()
    snapshot.take({"x": torch.zeros(4)})

    def fails(*_):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(torch.Tensor, "copy_", fails)
    with pytest.raises(RuntimeError):
        snapshot.fill()
    assert snapshot.fence() == 0.0
