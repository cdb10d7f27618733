"""A run resumed with a different number of ranks sees every training sample of the epoch exactly once."""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

import pytest
from helpers import Launch, losses, read_jsonl, train_cmd

from prefix.data.corpus import write_split

SAMPLES, GLOBAL_BATCH, SEQ = 960, 8, 64
STEPS_PER_EPOCH = SAMPLES // GLOBAL_BATCH


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """960 one-window documents: sample i of the train split is exactly document i."""
    root = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    docs = [bytes(rng.randrange(32, 127) for _ in range(SEQ)) for _ in range(SAMPLES)]
    assert write_split(docs, root / "train", SEQ) == SAMPLES
    assert write_split(docs[:40], root / "val", SEQ) == 40
    return root


def settings(data: Path, max_steps: int) -> tuple[str, ...]:
    return (f"data.local={data}", "data.record_samples=true", f"trainer.max_steps={max_steps}",
            f"trainer.global_batch_size={GLOBAL_BATCH}", "trainer.micro_batch_size=2",
            "trainer.eval_every=0", "checkpoint.every_steps=25")


def samples_by_step(run_dir: Path) -> dict[int, list[int]]:
    """Every step's sample indices across ranks (steps are recorded once: stops were SIGTERMs)."""
    seen: dict[int, list[int]] = defaultdict(list)
    for path in sorted((run_dir / "metrics").glob("samples_rank*.jsonl")):
        for record in read_jsonl(path):
            seen[record["step"]] += record["indices"]
    return seen


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_with_other_world_size_sees_each_sample_once(dataset, tmp_path, before, after, parallelism):
    """Under fsdp DCP reshards the checkpoint for the new world size (1 rank: a process group of one)."""
    run_dir, total = tmp_path / "r", STEPS_PER_EPOCH + 10
    chosen = (*settings(dataset, total), f"trainer.parallelism={parallelism}")
    first = Launch(train_cmd(before, "r", tmp_path, *chosen), tmp_path / "log1")
    first.wait_for_step(run_dir, random.randint(10, 60))
    first.sigterm()
    first.wait()
    stopped_at = max(losses(run_dir))
    assert 0 < stopped_at < STEPS_PER_EPOCH
    second = Launch(train_cmd(after, "r", tmp_path, *chosen), tmp_path / "log2")
    assert second.wait() == 0, (tmp_path / "log2").read_text()[-3000:]
    loss = losses(run_dir)
    assert abs(loss[stopped_at + 1] - loss[stopped_at]) < 0.5 < loss[1] - loss[stopped_at + 1], \
        "the loss goes on from where it stopped: the resharded weights and optimizer were loaded"

    seen = samples_by_step(run_dir)
    assert sorted(seen) == list(range(1, total + 1))
    assert all(len(ids) == GLOBAL_BATCH for ids in seen.values())
    epoch0 = [i for step in range(1, STEPS_PER_EPOCH + 1) for i in seen[step]]
    assert sorted(epoch0) == list(range(SAMPLES)), "every sample of epoch 0 exactly once"
    epoch1 = [i for step in range(STEPS_PER_EPOCH + 1, total + 1) for i in seen[step]]
    assert len(set(epoch1)) == len(epoch1), "the next epoch starts afresh, without repeats"


def test_resume_exactly_at_an_epoch_end_starts_the_next_epoch(dataset, tmp_path):
    run_dir = tmp_path / "r"
    first = Launch(train_cmd(2, "r", tmp_path, *settings(dataset, STEPS_PER_EPOCH)), tmp_path / "log1")
    assert first.wait() == 0
    second = Launch(train_cmd(2, "r", tmp_path, *settings(dataset, STEPS_PER_EPOCH + 10)), tmp_path / "log2")
    assert second.wait() == 0, (tmp_path / "log2").read_text()[-3000:]
    seen = samples_by_step(run_dir)
    assert sorted(seen) == list(range(1, STEPS_PER_EPOCH + 11))
    epoch1 = [i for step in range(STEPS_PER_EPOCH + 1, STEPS_PER_EPOCH + 11) for i in seen[step]]
    assert len(epoch1) == 10 * GLOBAL_BATCH and len(set(epoch1)) == len(epoch1)
