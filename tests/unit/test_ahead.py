"""distributed.Ahead: rank 0's part of `on_main` begun early, in a thread, answered later (one process here;
tests/integration/test_restart.py has two ranks under torchrun)."""

from __future__ import annotations

import threading

import pytest

from prefix.checkpoint import NoUsableCheckpoint
from prefix.distributed import Ahead, World
from prefix.errors import UserError

ALONE = World()


def test_the_work_runs_while_the_caller_goes_on() -> None:
    go = threading.Event()
    ahead = Ahead(ALONE, lambda: go.wait(10) and "verified")
    go.set()  # had fn run on the caller's thread, it would have waited its 10 s before this line
    assert ahead.result() == "verified"
    assert ahead.result() == "verified"  # asked again: the same answer


def test_a_refusal_is_the_same_one_line_error_raised_on_every_rank() -> None:
    def verify() -> None:
        raise NoUsableCheckpoint("/runs/r/checkpoints: no usable checkpoint (latest.pt: damaged or truncated)")

    ahead = Ahead(ALONE, verify)
    with pytest.raises(NoUsableCheckpoint, match="no usable checkpoint") as raised:
        ahead.result()
    assert isinstance(raised.value, UserError) and raised.value.exit_code == 2
    assert raised.value.same_on_every_rank  # only rank 0 prints it


def test_a_bug_in_the_work_is_raised_as_it_is() -> None:
    ahead = Ahead(ALONE, lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        ahead.result()


def test_other_ranks_run_nothing_themselves() -> None:
    ran = threading.Event()
    Ahead(World(rank=1, world_size=2), ran.set)  # its result() is rank 0's answer, broadcast
    assert not ran.wait(0.2)
