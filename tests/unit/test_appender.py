"""Appender on a real full tmpfs: reported once, bounded backlog, order kept, torn lines contained."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import structlog

from prefix.appender import Appender
from prefix.runs import read_jsonl
from prefix.telemetry import Metrics, setup_logging

PAGE = 4096  # tmpfs allocates whole pages: a write that needs one more page than is free is cut there


def fill(folder: Path) -> Path:
    """A file that takes every free byte of `folder`'s volume."""
    filler, free = folder / "filler", os.statvfs(folder)
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, free.f_bavail * free.f_frsize)
    return filler


class Reports(list):
    """An Appender's report callback that keeps (level, event, fields)."""

    def __call__(self, level: str, event: str, fields: dict) -> None:
        self.append((level, event, fields))

    def levels(self) -> list[str]:
        return [level for level, _, _ in self]


def numbers(path: Path) -> list[int]:
    return [row["i"] for row in read_jsonl(path)]


@pytest.mark.parametrize("bound", [{"max_lines": 5}, {"max_bytes": 5 * len('{"i": 0}\n')}])
def test_a_full_volume_is_reported_once_and_the_newest_lines_land_in_order(tmp_path, tmpfs, bound):
    tmpfs(tmp_path / "vol", 64)
    filler, target = fill(tmp_path / "vol"), tmp_path / "vol" / "m.jsonl"
    reports = Reports()
    sink = Appender("metrics", reports, retry_s=1.0, reserve_bytes=0, **bound)
    for i in range(8):
        sink.append(target, json.dumps({"i": i}))  # never raises
    assert reports.levels() == ["warning"]
    level, event, fields = reports[0]
    assert event.startswith("metrics: a write failed") and "training goes on" in event
    assert fields["file"] == str(target) and "No space left on device" in fields["error"]
    assert target.stat().st_size == 0

    filler.unlink()
    sink.append(target, json.dumps({"i": 8}))
    assert target.stat().st_size == 0, "retried before retry_s passed"
    time.sleep(1.05)
    sink.append(target, json.dumps({"i": 9}))  # the retry: the 5 newest land, in order
    assert numbers(target) == [5, 6, 7, 8, 9]
    assert reports[1:] == [("info", "metrics: writing again", {"file": str(target), "late": 5, "lost": 5})]
    sink.append(target, json.dumps({"i": 10}))
    sink.close()
    assert numbers(target) == [5, 6, 7, 8, 9, 10] and len(reports) == 2


@pytest.mark.parametrize("max_lines", [100, 1], ids=["rest-written", "rest-dropped"])
def test_a_line_cut_by_a_full_volume_never_swallows_the_next(tmp_path, tmpfs, max_lines):
    tmpfs(tmp_path / "vol", 64)
    filler, target = fill(tmp_path / "vol"), tmp_path / "vol" / "m.jsonl"
    os.truncate(filler, filler.stat().st_size - PAGE)  # one page free: lines 0-39 of 100 bytes, 96 of line 40
    reports = Reports()
    sink = Appender("metrics", reports, retry_s=0.2, reserve_bytes=0, max_lines=max_lines)
    line = lambda i: json.dumps({"i": i, "pad": "x" * (99 - len(json.dumps({"i": i, "pad": ""})))})  # noqa: E731
    for i in range(42):
        sink.append(target, line(i))
    assert target.stat().st_size == PAGE and reports.levels() == ["warning"]  # line 40 was cut, 41 waits
    filler.unlink()
    time.sleep(0.25)
    sink.append(target, line(42))
    sink.close()
    if max_lines == 100:  # the rest of line 40 went first: every line whole
        assert numbers(target) == list(range(43))
        assert reports[1][2]["lost"] == 0
    else:  # the rest of line 40 and line 41 were dropped: the fragment is a line of its own, 42 is whole
        raw = target.read_text().splitlines()
        assert len(raw) == 42 and raw[40] == line(40)[:96] and raw[41] == line(42)
        assert numbers(target) == [*range(40), 42]
        assert reports[1][2]["lost"] == 2


def test_a_line_cut_by_an_earlier_process_is_closed_before_the_first_append(tmp_path):
    target = tmp_path / "m.jsonl"
    target.write_text('{"i": 0}\n{"i": 1, "cut by a ki')
    sink = Appender("metrics", Reports())
    sink.append(target, json.dumps({"i": 2}))
    sink.close()
    assert numbers(target) == [0, 2]


def test_below_the_reserve_lines_wait_and_close_writes_them(tmp_path, tmpfs):
    """A 1 MiB volume keeps 5 % (52 KiB) for checkpoints: with 40 KiB free, appends wait with no OSError."""
    tmpfs(tmp_path / "vol", 1024)
    filler, target = fill(tmp_path / "vol"), tmp_path / "vol" / "m.jsonl"
    os.truncate(filler, filler.stat().st_size - 10 * PAGE)
    reports = Reports()
    sink = Appender("logs", reports)
    for i in range(3):
        sink.append(target, json.dumps({"i": i}))
    assert target.stat().st_size == 0
    assert reports.levels() == ["warning"] and "kept for checkpoints" in reports[0][2]["error"]
    sink.close()  # the final checkpoint is done by then: what waits is written
    assert numbers(target) == [0, 1, 2] and reports.levels() == ["warning", "info"]


def test_before_write_is_called_before_every_append_and_may_refuse_it(tmp_path):
    calls: list[int] = []
    metrics = Metrics(tmp_path / "metrics", enabled=True)
    metrics.before_write = lambda: calls.append(1)
    metrics.write("train", 1, loss=1.0)
    metrics.write("eval", 1, val_loss=1.0)
    assert calls == [1, 1] and metrics.sink.before_write is metrics.before_write

    def fenced() -> None:
        raise RuntimeError("fenced")

    metrics.before_write = fenced
    with pytest.raises(RuntimeError, match="fenced"):
        metrics.write("train", 2, loss=1.0)
    metrics.close()
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics" / "train.jsonl")] == [1]


def test_the_log_file_on_a_full_volume_warns_once_on_stderr_then_catches_up(tmp_path, tmpfs, capfd):
    tmpfs(tmp_path / "vol", 64)
    filler = fill(tmp_path / "vol")
    try:
        log = setup_logging(1, tmp_path / "vol" / "logs")
        for i in range(5):
            log.warning("tick", i=i)
        filler.unlink()
        setup_logging(1)  # closes the log file: what waits lands
    finally:
        structlog.reset_defaults()
    stderr = capfd.readouterr().err
    assert stderr.count("logs: a write failed") == 1 and "[Errno 28]" in stderr
    assert stderr.count("tick") == 5
    events = [e["event"] for e in read_jsonl(tmp_path / "vol" / "logs" / "rank1.jsonl")]
    assert events[0] == "tick" and events[1].startswith("logs: a write failed")
    assert events[2:] == ["tick"] * 4 + ["logs: writing again"]
