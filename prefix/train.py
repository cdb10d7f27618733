"""Entry point: `python -m prefix.train --config FILE [--run-name NAME] [section.key=value ...]`.

Wires the components together and nothing more. Exit codes: 0 finished (or already finished),
143 stopped by a signal after the final checkpoint, 2 a problem the user can fix.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

from prefix import config, distributed, drift, hf
from prefix.checkpoint import Checkpointer, log_findings, set_rng_state
from prefix.errors import UserError
from prefix.preemption import Preemption, default_actions, exit_promptly
from prefix.registry import Registry
from prefix.run_manager import RunManager
from prefix.runs import RunDir, check_run_name, runs_root
from prefix.sample import save_tokenizer
from prefix.system_metrics import SystemSampler
from prefix.telemetry import setup_logging


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="prefix.train", description="Train a GPT; a run whose directory "
                                "holds a checkpoint resumes from it.")
    p.add_argument("--config", help="YAML config file (sections run, data, model, trainer, checkpoint)")
    p.add_argument("--run-name", help="run identity; starting the same name again resumes it "
                                      "(default: the config file's name)")
    p.add_argument("--runs-root", help="folder of run directories (default: $PREFIX_RUNS_ROOT, else ./runs)")
    p.add_argument("--experiment", help="experiment the run belongs to, in the registry (default: the config "
                                        "file's name)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even if the model shape, data, seed, global batch or optimizer changed")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return p.parse_args(argv)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run(args: argparse.Namespace) -> int:
    cfg = config.load(args.config, args.overrides)
    stem = Path(args.config).stem if args.config else "default"
    name = check_run_name(args.run_name or stem)
    root = runs_root(args.runs_root)
    run_dir = RunDir(root / name)
    run_dir.check()
    world = distributed.init(cfg.trainer.device)
    accum = config.check_world(cfg, world.world_size)
    log = setup_logging(world.rank)  # console only: nothing is written before every check passed
    run = RunManager(run_dir, args.experiment or stem, Registry(root) if world.is_main else None, log,
                     main=world.is_main, tensorboard=cfg.telemetry.tensorboard)

    checkpointer = Checkpointer(run_dir.checkpoints, world, cfg.checkpoint)
    choice, findings = checkpointer.find()
    state, rank_state = checkpointer.load(choice) if choice else (None, None)
    start_step = int(state["step"]) if state else 0
    changes = drift.check(state["config"], cfg.to_dict(), start_step, args.allow_config_change) if state else {}
    if start_step >= cfg.trainer.max_steps:  # decided before any data pipeline exists
        log.info("run already finished; nothing to do", step=start_step, max_steps=cfg.trainer.max_steps)
        return 0
    init = hf.check_init_from(cfg.model) if cfg.model.init_from and state is None else None  # fresh start

    # Imported here: streaming and the model are not needed to decide "already finished".
    from prefix.data import streams
    from prefix.data.leftovers import clean_node
    from prefix.data.loader import TrainStream, ValStream
    from prefix.model import GPT
    from prefix.trainer import Trainer

    clean_node(world, log)  # before any dataset: streaming's shared memory of killed runs
    sources = streams.resolve(cfg, world, log)
    streams.check_vocab(sources, cfg.model.vocab_size, cfg.model.init_from if init else None)
    tokenizer = streams.tokenizer(sources)
    if state is not None and state.get("dataloader"):
        drift.check_data_versions(state["dataloader"].get("versions"), [s.version for s in sources], start_step,
                                  args.allow_config_change)
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    model = GPT(cfg.model).to(world.device)
    if init is not None:
        init.load_into(model)  # before any step; the init draws above keep every RNG stream the same
    seed_everything(cfg.run.seed + world.rank)  # then one RNG stream per rank
    train = TrainStream(cfg, sources, accum, pin_memory=world.device.type == "cuda")
    trainer = sampler = None
    exit_code = 1  # what the registry records if this start dies of an unexpected error
    try:
        val = ValStream(cfg, sources) if cfg.trainer.eval_every else None

        distributed.on_main(world, run.create)  # from here on the run directory is written
        run.log = log = setup_logging(world.rank, run_dir.logs)
        if world.is_main:
            log_findings(log, choice, findings)
            checkpointer.clean_temporary()
            restarts = run.begin(start_step, cfg.trainer.max_steps, world.world_size, cfg.to_dict(), changes)
            if tokenizer is not None:
                save_tokenizer(run_dir.meta, tokenizer)  # for prefix sample
            log.info("starting", run=str(run_dir.path), world_size=world.world_size, accum=accum,
                     restarts=restarts, device=str(world.device), config_changes=changes or None)
            hf.log_init(log, init, cfg.model, start_step)
        trainer = Trainer(cfg, world, model, train, val, tokenizer, checkpointer, Preemption(), run, log)
        if state is not None:
            trainer.load_state_dict(state)
            if rank_state is not None:
                set_rng_state(rank_state["rng"])
            else:
                log.warning("no RNG state saved for this rank (world size grew); seeded fresh", rank=world.rank)
            log.info(f"resumed from step {start_step}", step=start_step, tokens_seen=trainer.tokens_seen)
        if world.is_main:
            log.info("model", params=model.num_params(), steps_per_epoch=train.steps_per_epoch)
        run.metrics.starting_at(start_step)  # TensorBoard: a previous start's events past here are redone
        if world.is_main or cfg.telemetry.all_ranks:
            sampler = SystemSampler(run_dir.metrics, cfg.telemetry.system_every_s, world.rank, world.device,
                                    run_dir.path, step_fn=lambda: trainer.step, log=log,
                                    scalars=run.metrics.scalars).start()
        exit_code = trainer.fit()
        return exit_code
    except UserError as e:
        exit_code = e.exit_code
        raise
    finally:
        if sampler is not None:
            sampler.stop()
        if trainer is not None:
            trainer.close()
        run.finish(exit_code, trainer.step if trainer is not None else None)
        train.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0")) if os.environ.get("RANK", "0").isdigit() else 0
    setup_logging(rank)
    default_actions()
    try:
        return run(args)
    except UserError as e:
        if rank == 0 or not e.same_on_every_rank:
            print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    exit_promptly(main())  # an unexpected error raises out of main() instead, with the usual teardown
