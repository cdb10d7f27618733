"""The Trainer built in this process from real parts (default corpus, streaming loader, checkpointer)."""

from __future__ import annotations

from pathlib import Path

import pytest
import structlog
import torch
from helpers import TINY

from prefix import config
from prefix.checkpoint import Checkpointer, choose
from prefix.data import streams
from prefix.data.loader import TrainStream
from prefix.distributed import World
from prefix.model import GPT
from prefix.preemption import Preemption
from prefix.runs import RunDir, read_jsonl
from prefix.runs.manager import RunManager
from prefix.state import TrainState
from prefix.trainer import Trainer

QUIET = ["data.num_workers=0", "trainer.eval_every=0", "trainer.sample_tokens=0", "telemetry.progress=never",
         "telemetry.tensorboard=false", "trainer.log_every=2", "checkpoint.every_steps=0", "trainer.device=cpu"]


def build(run_dir: RunDir, max_steps: int) -> Trainer:
    """What prefix.train wires for one rank, without a process group."""
    cfg = config.load(TINY, [*QUIET, f"trainer.max_steps={max_steps}"])
    world, log = World(rank=0, world_size=1), structlog.get_logger()
    run = RunManager(run_dir, "test", None, log)
    run.create()
    run.begin(0, max_steps, 1, cfg.to_dict())
    sources = streams.resolve(cfg, world, log)
    torch.manual_seed(cfg.run.seed)
    train = TrainStream(cfg, sources, config.check_world(cfg, 1))
    return Trainer(cfg, world, GPT(cfg.model), train, None, None, Checkpointer(run_dir.checkpoints, world,
                   cfg.checkpoint), Preemption(), run, log)


@pytest.fixture
def trainer_at_4(tmp_path: Path) -> tuple[RunDir, TrainState]:
    run_dir = RunDir(tmp_path / "run")
    first = build(run_dir, max_steps=4)
    try:
        assert first.fit() == 0
    finally:
        first.close()
        first.train.close()
    choice, _ = choose(run_dir.checkpoints, 1)
    return run_dir, TrainState.load(run_dir.checkpoints / "latest.pt") if choice else None


def test_the_first_log_line_after_a_resume_measures_this_start_only(trainer_at_4):
    """With a clock where every step takes one second, tokens/s is the tokens of one step and step_time 1,
    also on the first line after a resume (the window used to start at step 0 with this start's clock)."""
    run_dir, state = trainer_at_4
    assert state.step == 4
    trainer = build(run_dir, max_steps=8)
    trainer.clock = lambda: float(max(trainer.step - 4, 0))  # seconds of this start: one per step
    trainer.load_state_dict(state)
    try:
        assert trainer.fit() == 0
    finally:
        trainer.close()
        trainer.train.close()
    lines = [r for r in read_jsonl(run_dir.metrics / "train.jsonl") if r["step"] > 4]
    cfg = trainer.cfg
    per_step = cfg.trainer.global_batch_size * cfg.model.seq_len
    assert [r["step"] for r in lines] == [6, 8]
    assert [(r["tokens_per_sec"], r["step_time"]) for r in lines] == [(per_step, 1.0)] * 2
