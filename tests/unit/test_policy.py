"""The step-boundary decision (checkpoint/policy.py), every rule by itself."""

from __future__ import annotations

from dataclasses import replace

import pytest

from prefix.checkpoint.policy import Boundary, Save

QUIET = Boundary(step=50, max_steps=100, stop=False, time_due=False, writing=False, steps_due=False,
                 in_flight=None, committed=40)


def test_nothing_happens_between_intervals():
    assert not QUIET.commit() and QUIET.save() is None and QUIET.outcome() == "train"


@pytest.mark.parametrize("due", ["steps_due", "time_due"])
def test_an_interval_saves_in_the_background(due):
    assert replace(QUIET, **{due: True}).save() == Save(final=False, background=True)


def test_without_async_a_periodic_save_is_synchronous_but_not_fatal():
    plan = replace(QUIET, steps_due=True, asynchronous=False).save()
    assert plan == Save(final=False, background=False)


@pytest.mark.parametrize("end", [{"stop": True}, {"step": 100}])
def test_the_final_save_is_synchronous_and_fatal(end):
    at = replace(QUIET, **end)
    assert at.save() == Save(final=True, background=False)
    assert at.outcome() == ("stop" if "stop" in end else "finish")


def test_a_step_already_committed_is_not_saved_again():
    assert replace(QUIET, stop=True, committed=50).save() is None
    assert replace(QUIET, step=0, stop=True, committed=None).save() is None, "step 0 has nothing to save"


def test_a_write_in_flight_commits_once_no_rank_writes():
    writing = replace(QUIET, in_flight=40, committed=30, writing=True)
    assert not writing.commit()
    assert replace(writing, writing=False).commit()


@pytest.mark.parametrize("end", [{"stop": True}, {"step": 100}])
def test_a_stop_or_the_end_commits_the_write_in_flight_even_while_ranks_write(end):
    assert replace(QUIET, in_flight=40, committed=30, writing=True, **end).commit()


@pytest.mark.parametrize("due", ["steps_due", "time_due"])
def test_a_periodic_save_due_while_a_write_is_in_flight_is_skipped_not_waited_for(due):
    busy = replace(QUIET, in_flight=40, committed=30, writing=True, **{due: True})
    assert busy.skip() and busy.save() is None
    assert not replace(QUIET, **{due: True}).skip(), "nothing in flight: nothing to skip"


def test_a_step_the_history_keeps_is_never_skipped_it_commits_the_write_in_flight_first():
    kept = replace(QUIET, in_flight=40, committed=30, writing=True, kept=True)
    assert kept.commit() and not kept.skip()
    assert replace(kept, in_flight=None, committed=40).save() == Save(final=False, background=True)


def test_a_skipped_save_is_owed_until_the_next_boundary_without_a_write_in_flight():
    owed = replace(QUIET, owed=True)
    assert owed.save() == Save(final=False, background=True) and not owed.skip()
    assert replace(owed, in_flight=40, committed=30, writing=True).skip(), "still writing: skipped again"
    assert replace(owed, committed=50).save() is None, "the step is committed already"


def test_a_stop_wins_over_the_end():
    assert replace(QUIET, step=100, stop=True).outcome() == "stop"
