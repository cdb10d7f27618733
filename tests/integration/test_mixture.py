"""Two datasets mixed 0.75 / 0.25 by streaming's Stream weighting; a resume continues the same mixture."""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

import pytest
from helpers import (
    Launch,
    assert_clean_exit_2,
    assert_same_weights,
    checkpoint,
    losses,
    read_jsonl,
    train_cmd,
)
from helpers import run as run_cmd
from mds import dataset

PER_STREAM, GLOBAL_BATCH = 600, 8
EPOCH_STEPS = 2 * PER_STREAM // GLOBAL_BATCH  # proportions keep the epoch at the streams' total size
STEPS = EPOCH_STEPS + 10


@pytest.fixture(scope="module")
def streams(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mixture")
    return dataset(root / "a", train=PER_STREAM, seed=1), dataset(root / "b", train=PER_STREAM, seed=2)


def settings(streams: tuple[Path, Path], a: float = 0.75) -> tuple[str, ...]:
    mixture = f"[{{local: {streams[0]}, proportion: {a}}}, {{local: {streams[1]}, proportion: {1 - a}}}]"
    return (f"data.streams={mixture}", "data.record_samples=true", f"trainer.max_steps={STEPS}",
            f"trainer.global_batch_size={GLOBAL_BATCH}", "checkpoint.every_steps=20", "trainer.eval_every=50")


def samples_by_step(run_dir: Path) -> dict[int, list[int]]:
    seen: dict[int, list[int]] = defaultdict(list)
    for path in sorted((run_dir / "metrics").glob("samples_rank*.jsonl")):
        for record in read_jsonl(path):
            seen[record["step"]] += record["indices"]
    return dict(seen)


@pytest.fixture(scope="module")
def baseline(streams, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("baseline")
    launch = Launch(train_cmd(2, "base", root, *settings(streams)), root / "log")
    assert launch.wait() == 0, (root / "log").read_text()[-3000:]
    return root / "base"


def share_of_first(indices: list[int]) -> float:
    """Dataset indices run over stream a's samples first, then stream b's."""
    return sum(i < PER_STREAM for i in indices) / len(indices)


def test_mixture_delivers_the_proportions(baseline: Path) -> None:
    by_step = samples_by_step(baseline)
    epoch = [i for step in range(1, EPOCH_STEPS + 1) for i in by_step[step]]
    assert share_of_first(epoch) == pytest.approx(0.75, abs=0.01)
    first_half = [i for step in range(1, EPOCH_STEPS // 2 + 1) for i in by_step[step]]
    assert share_of_first(first_half) == pytest.approx(0.75, abs=0.05), "mixed throughout, not in blocks"
    assert len(set(i for i in epoch if i >= PER_STREAM)) == len([i for i in epoch if i >= PER_STREAM]), \
        "the 0.25 stream is subsampled without repeats"


def test_resume_continues_the_same_mixture(streams, baseline: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    first = Launch(train_cmd(2, "r", tmp_path, *settings(streams)), tmp_path / "log1")
    first.wait_for_step(run_dir, random.randint(20, 100))
    first.sigterm()
    first.wait()
    assert max(losses(run_dir)) < STEPS
    second = Launch(train_cmd(2, "r", tmp_path, *settings(streams)), tmp_path / "log2")
    assert second.wait() == 0, (tmp_path / "log2").read_text()[-3000:]
    assert samples_by_step(run_dir) == samples_by_step(baseline)
    assert_same_weights(checkpoint(run_dir).model, checkpoint(baseline).model)
    assert checkpoint(run_dir).config["data"]["streams"][0]["proportion"] == 0.75

    changed = run_cmd(train_cmd(0, "r", tmp_path, *settings(streams, a=0.5)))
    assert_clean_exit_2(changed, "data.streams")
