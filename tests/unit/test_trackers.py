"""The relay between the step loop and a tracker: redone steps once, catch-up, outages, bounded close.

`Notebook` is a tracker of our own that keeps what it is given (the relay is what is tested here; the
real trackers are tested against their real libraries in tests/integration)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import structlog.testing

from prefix.telemetry import Metrics, RunInfo, Tracker, metrics, trackers
from prefix.telemetry.trackers import RESTART, Record


class Notebook(Tracker):
    name = "notebook"

    def __init__(self, down: int = 0, holds: dict[str, int] | None = None, stuck: threading.Event | None = None):
        self.down, self.holds, self.stuck = down, holds or {}, stuck
        self.records: list[Record] = []
        self.finished: tuple[dict[str, float], list[Path]] | None = None
        self.opened_with: dict[str, Any] | None = None

    def open(self, run: RunInfo, saved: dict[str, Any]) -> dict[str, int]:
        self.opened_with = saved
        return self.holds

    def state(self) -> dict[str, Any]:
        return {"id": "run-1"}

    def log(self, records: list[Record]) -> None:
        if self.stuck is not None:
            self.stuck.wait()
        if self.down > 0:
            self.down -= 1
            raise ConnectionError("tracker unreachable")
        self.records.extend(records)

    def finish(self, summary: dict[str, float], artifacts: list[Path]) -> None:
        self.finished = (summary, artifacts)

    def steps(self, split: str = "train") -> list[int]:
        return [r.step for r in self.records if r.split == split]


def start(root: Path, tracker: Tracker, start_step: int = 0) -> Metrics:
    (root / "meta").mkdir(parents=True, exist_ok=True)
    m = Metrics(root / "metrics", enabled=True, trackers=[tracker])
    m.start(RunInfo("r", root, "exp", 1.0, {"trainer": {"lr": 0.1}}, start_step, restarts=int(start_step > 0)))
    return m


def train(m: Metrics, steps: range, offset: float = 0.0) -> None:
    for step in steps:
        m.write("train", step, loss=float(step) + offset, note="text")


def test_steps_redone_after_a_kill_are_logged_once(tmp_path: Path) -> None:
    first = Notebook()
    m = start(tmp_path, first)
    train(m, range(1, 11))
    m.close()
    assert first.steps() == list(range(1, 11)) and first.opened_with == {}
    second = Notebook()
    m = start(tmp_path, second, start_step=5)  # resumed from the checkpoint at 5: 6..10 are redone
    train(m, range(6, 13), offset=0.5)
    m.close()
    assert second.opened_with == {"id": "run-1", "held": {"train": 10}}  # the cursor in meta/trackers.json
    assert second.steps() == [11, 12]  # the tracker holds 1..10 once; the redone ones are not sent again
    assert [r.values["restart"] for r in second.records if r.split == RESTART] == [1]
    assert all(r.values == {"loss": r.step + 0.5, "note": "text"} for r in second.records if r.split == "train")


def test_a_start_whose_tracker_was_down_is_caught_up_from_the_metrics_files(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "CLOSE_S", 0.5)
    m = start(tmp_path, Notebook(down=10**6))  # down for the whole start
    train(m, range(1, 11))
    m.close()
    caught = Notebook()
    m = start(tmp_path, caught, start_step=8)
    train(m, range(9, 12), offset=0.5)
    m.close()
    assert caught.steps() == list(range(1, 12))  # 1..8 from train.jsonl, 9..11 from this start
    assert [r.values["loss"] for r in caught.records if r.split == "train"][7:] == [8.0, 9.5, 10.5, 11.5]


def test_what_the_tracker_says_it_holds_beats_the_cursor(tmp_path: Path) -> None:
    m = start(tmp_path, Notebook())
    train(m, range(1, 11))
    m.close()
    lost = Notebook(holds={"train": 7})  # its server kept only up to 7 (the rest died with the process)
    m = start(tmp_path, lost, start_step=10)
    m.close()
    assert lost.steps() == [8, 9, 10]


def test_an_outage_is_said_once_and_nothing_is_lost(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trackers, "RETRY_S", (0.05, 0.1))
    flaky = Notebook(down=5)
    with structlog.testing.capture_logs() as logs:
        m = start(tmp_path, flaky)
        train(m, range(1, 201))
        m.close(summary={"train/loss": 1.0}, artifacts=[tmp_path / "loss.png"])
    assert flaky.steps() == list(range(1, 201))
    events = [e["event"] for e in logs if e.get("tracker") == "notebook"]
    assert events == ["tracker: log failed; training goes on, retrying", "tracker: log works again"]
    assert flaky.finished == ({"train/loss": 1.0}, [tmp_path / "loss.png"])


def test_a_hung_tracker_never_holds_the_step_loop_or_the_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "CLOSE_S", 0.5)
    stuck = threading.Event()
    hung = Notebook(stuck=stuck)
    with structlog.testing.capture_logs() as logs:
        m = start(tmp_path, hung)
        train(m, range(1, 1001))  # queued, not delivered: write() does not wait for the tracker
        m.close()
    stuck.set()
    assert (tmp_path / "metrics" / "train.jsonl").read_text().count("\n") == 1000
    assert any(e["event"].startswith("tracker did not take everything") for e in logs)


def test_the_ledger_is_not_sent_to_trackers(tmp_path: Path) -> None:
    book = Notebook()
    m = start(tmp_path, book)
    m.write("time", 1, event="start", process_start=time.time())
    m.write("eval", 1, val_loss=2.0)
    m.close()
    assert {r.split for r in book.records} == {RESTART, "eval"}


def test_every_prompt_of_a_sample_step_is_sent_once(tmp_path: Path) -> None:
    book = Notebook()
    m = start(tmp_path, book)
    for step in (10, 20):
        for prompt in ("def ", "class "):
            m.write("samples", step, prompt=prompt, text=f"{prompt}{step}")
    m.write("samples", 20, prompt="def ", text="again")  # a step's prompt twice: the first stays
    m.close()
    assert [(r.step, r.values["text"]) for r in book.records if r.split == "samples"] == [
        (10, "def 10"), (10, "class 10"), (20, "def 20"), (20, "class 20")]


def test_a_sample_step_a_previous_start_logged_is_not_sent_again(tmp_path: Path) -> None:
    m = start(tmp_path, Notebook())
    m.write("samples", 10, prompt="def ", text="first")
    m.close()
    again = Notebook()
    m = start(tmp_path, again, start_step=5)  # redoes step 10, samples included
    m.write("samples", 10, prompt="def ", text="redone")
    m.write("samples", 10, prompt="class ", text="redone")
    m.write("samples", 20, prompt="def ", text="new")
    m.close()
    assert [(r.step, r.values["text"]) for r in again.records if r.split == "samples"] == [(20, "new")]
