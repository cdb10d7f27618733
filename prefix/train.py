"""Entry point: `python -m prefix.train --config FILE [--run-name NAME] [section.key=value ...]`.

Wires the components together and nothing more. Exit codes: 0 finished (or already finished),
143 stopped by a signal after the final checkpoint, 2 a problem the user can fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefix.errors import UserError, exit_code_of, report
from prefix.runs import add_runs_root

if TYPE_CHECKING:
    from prefix.runs import RunDir


def arguments(p: argparse.ArgumentParser) -> None:
    from prefix.config import SECTIONS

    p.add_argument("--config", help=f"YAML config file with the sections {', '.join(SECTIONS)} "
                                    "(`--print-config` shows every key)")
    p.add_argument("--run-name", help="run identity; starting the same name again resumes it "
                                      "(default: the config file's name)")
    add_runs_root(p)
    p.add_argument("--experiment", help="experiment the run belongs to, in the registry (default: the one the run "
                                        "was first started with, else the config file's name)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even if the model shape, data, seed, global batch or optimizer changed")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as YAML, every key with its one-line doc, and exit")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, before or after the flags (e.g. trainer.max_steps=1000)")


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(args: argparse.Namespace) -> int:
    from prefix import config, distributed
    from prefix.preemption import Preemption
    from prefix.runs import RunDir, check_run_name, runs_root
    from prefix.telemetry import setup_logging

    cfg = config.load(args.config, args.overrides)
    stem = Path(args.config).stem if args.config else "default"
    name = check_run_name(args.run_name or stem)
    root = runs_root(args.runs_root)
    run_dir = RunDir(root / name)
    run_dir.check()
    fsdp = cfg.trainer.parallelism == "fsdp"
    world = distributed.local(cfg.trainer.device)  # no process group yet: it comes up while rank 0 reads ahead
    try:
        accum, refused = check(cfg, world), None  # what cannot run is refused before anything is read
    except UserError as e:  # raised once every rank joined the group: rank 0, which says it, is then there
        accum, refused = 0, e
    log = setup_logging(world.rank)  # console only: nothing is written before every check passed
    preemption = Preemption()
    taken = None if refused else take_lease(world, run_dir, cfg.run.lease_timeout_s, log, preemption)  # one writer
    lease = None if isinstance(taken, UserError) else taken  # rank 0's, until share_lease
    try:
        # Rank 0 verifies the checkpoint in a thread while the process group comes up and the start imports what
        # it needs; `start` waits for the answer where it uses it (docs/performance.md#restart-time).
        reading = None if cfg.checkpoint.remote or refused or isinstance(taken, UserError) else \
            distributed.Ahead(world, partial(read_ahead, world, run_dir))
        world = distributed.join(world, cfg.distributed.timeout_s, always_group=fsdp)  # FSDP's mesh: even of one
        if refused:
            raise refused
        lease = share_lease(world, taken, run_dir, cfg.run.lease_timeout_s, log, preemption)
        return start(args, cfg, world, run_dir, accum, lease, preemption, log, reading)
    finally:
        if lease is not None:
            lease.release()


def check(cfg: Any, world: Any) -> int:
    """The checks that need the world size: gradient-accumulation steps, and memory enough (a run that cannot
    fit is refused before any data or checkpoint is read)."""
    from prefix import config

    accum = config.check_world(cfg, world.world_size)
    if world.device.type in ("cuda", "cpu"):
        from prefix import memory

        memory.check_fits(cfg, world.world_size, *memory.available(world), device=world.device.type)
    return accum


def take_lease(world: Any, run_dir: Any, timeout_s: float, log: Any, preemption: Any) -> Any:
    """Rank 0 takes the run's lease (waiting for another start to let go) and renews it from then on, before the
    process group is up; a refusal is returned, for `share_lease` to raise on every rank once it is."""
    from prefix.runs.lease import Lease

    if not world.is_main:
        return None
    try:
        lease = Lease.take(run_dir.path, timeout_s, log)
    except UserError as e:
        return e
    lease.renew_in_background(stopping=lambda: preemption.requested)
    return lease


def share_lease(world: Any, taken: Any, run_dir: Any, timeout_s: float, log: Any, preemption: Any) -> Any:
    """Collective: every rank learns the epoch of the lease rank 0 took, or raises the refusal rank 0 got."""
    from prefix import distributed
    from prefix.runs.lease import Lease

    def taken_epoch() -> int:
        if isinstance(taken, UserError):
            raise taken
        return taken.epoch

    epoch = distributed.on_main(world, taken_epoch)
    if world.is_main:
        return taken
    lease = Lease(run_dir.path, epoch, timeout_s, log, holder=False)
    lease.renew_in_background(stopping=lambda: preemption.requested)
    return lease


def read_ahead(world: Any, run_dir: Any) -> Any:
    """Rank 0, holding the lease: the checkpoint to resume from, every file verified (`Checkpointer.find`'s
    answer, which a start with `checkpoint.remote` asks for instead)."""
    from prefix.checkpoint import choose
    from prefix.runs.lease import ceilings

    return choose(run_dir.checkpoints, world.world_size, ceilings(run_dir.path))


def start(args: argparse.Namespace, cfg: Any, world: Any, run_dir: Any, accum: int, lease: Any, preemption: Any,
          log: Any, reading: Any) -> int:
    """The rest of a start, once this start holds the run; `reading`: its checkpoint, verified ahead (or None:
    `checkpoint.remote` finds it)."""
    import torch

    from prefix import distributed, drift, pretrained
    from prefix.checkpoint import Checkpointer, log_findings, set_rng_state
    from prefix.runs.manager import RunManager
    from prefix.runs.registry import Registry
    from prefix.state import TrainState
    from prefix.system_metrics import SystemSampler
    from prefix.telemetry import setup_logging, trackers_for
    from prefix.watchdog import EXIT_HUNG

    stem, root, fsdp = Path(args.config).stem if args.config else "default", run_dir.path.parent, \
        cfg.trainer.parallelism == "fsdp"
    run = RunManager(run_dir, args.experiment or stem, Registry(root) if world.is_main else None, log,
                     main=world.is_main, trackers=trackers_for(cfg.telemetry, run_dir.tb) if world.is_main else (),
                     relabel=args.experiment is not None)
    run.guard, run.lease_wait_s, run.lease_epoch = lease.check, lease.waited_s, lease.epoch
    run.metrics.before_write = lease.check
    checkpointer = Checkpointer(run_dir.checkpoints, world, cfg.checkpoint, sharded_saves=fsdp, epoch=lease.epoch)
    checkpointer.guard = lease.check
    remote = None
    if cfg.checkpoint.remote:  # uploads every commit; a volume with nothing usable is restored from it first
        from prefix.checkpoint.remote import Remote
        from prefix.runs.lease import ceilings

        remote = Remote(checkpointer, cfg.checkpoint, run_dir.path.name, lease, log)
        choice, findings = remote.find(ceilings(run_dir.path) if world.is_main else {})
    else:
        choice, findings = reading.result()
    saved, rank_state = checkpointer.load(choice) if choice else (None, None)
    state = TrainState.from_dict(saved) if saved is not None else None
    start_step = state.step if state else 0
    lease.note_resume(start_step)  # checkpoints an older epoch commits past this step are a fenced start's
    changes = drift.check(state.config, cfg.to_dict(), start_step, args.allow_config_change) if state else {}
    if start_step >= cfg.trainer.max_steps:  # decided before any data pipeline exists
        log.info(drift.finished(start_step, cfg.trainer.max_steps, changes), step=start_step,
                 max_steps=cfg.trainer.max_steps, config_changes=changes or None)
        return 0
    init = pretrained.check_init_from(cfg.model) if cfg.model.init_from and state is None else None  # fresh start

    # Imported here: streaming and the model are not needed to decide "already finished".
    from prefix.data import streams, tokenizers
    from prefix.data.leftovers import clean_node
    from prefix.data.loader import TrainStream, ValStream
    from prefix.model import GPT
    from prefix.trainer import Trainer

    clean_node(world, log)  # before any dataset: streaming's shared memory of killed runs
    sources = streams.resolve(cfg, world, log)
    streams.check_vocab(sources, cfg.model.vocab_size, cfg.model.init_from if init else None)
    tokenizer = streams.tokenizer(sources)
    if state is not None and state.dataloader:
        drift.check_data_versions(state.dataloader.get("versions"), [s.version for s in sources], start_step,
                                  args.allow_config_change)
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    if fsdp:
        from prefix import sharding

        model = sharding.build(cfg, world)  # sharded from the start: never whole on any rank
    else:
        model = GPT(cfg.model).to(world.device)
    if init is not None:
        init.load_into(model)  # before any step; the init draws above keep every RNG stream the same
    seed_everything(cfg.run.seed + world.rank)  # then one RNG stream per rank
    train = TrainStream(cfg, sources, accum, pin_memory=world.device.type == "cuda")
    trainer = sampler = None
    exit_code = 1  # what the registry records if this start dies of an unexpected error
    try:
        if state is not None and state.dataloader:
            train.load_state_dict(state.dataloader)  # here, not in the trainer: its workers start fetching at once
        train.start()  # the first batch arrives while the trainer is built
        val = ValStream(cfg, sources) if cfg.trainer.eval_every else None

        distributed.on_main(world, run.create)  # from here on the run directory is written
        lease.wrote = True
        run.log = log = setup_logging(world.rank, run_dir.logs)
        if world.is_main:
            log_findings(log, choice, findings)
            checkpointer.clean_temporary()
            restarts = run.begin(start_step, cfg.trainer.max_steps, world.world_size, cfg.to_dict(), changes)
            if tokenizer is not None:
                tokenizers.save_copy(run_dir.meta, tokenizer)  # for prefix sample
            for message, numbers in train.cropped:
                log.warning(message, **numbers)
            log.info("starting", run=str(run_dir.path), world_size=world.world_size, accum=accum,
                     restarts=restarts, device=str(world.device), config_changes=changes or None)
            pretrained.log_init(log, init, cfg.model, start_step)
        trainer = Trainer(cfg, world, model, train, val, tokenizer, checkpointer, preemption, run, log)
        if state is not None:
            trainer.load_state_dict(dataclasses.replace(state, dataloader=None))  # the stream stands there already
            if rank_state is not None:
                set_rng_state(rank_state["rng"])
            else:
                log.warning("no RNG state saved for this rank (world size grew); seeded fresh", rank=world.rank)
            log.info(f"resumed from step {start_step}", step=start_step, tokens_seen=trainer.tokens_seen)
        if world.is_main:
            log.info("model", params=model.num_params(), steps_per_epoch=train.steps_per_epoch)
        if world.is_main or cfg.telemetry.all_ranks:
            sampler = SystemSampler(run_dir.metrics, cfg.telemetry.system_every_s, world.rank, world.device,
                                    run_dir.path, step_fn=lambda: trainer.step, log=log,
                                    scalars=run.metrics.scalars, before_write=lease.check).start()
        exit_code = trainer.fit()
        return exit_code
    except UserError as e:
        exit_code = e.exit_code
        raise
    except Exception as e:
        if distributed.peer_lost(e):
            exit_code = EXIT_HUNG
        raise
    finally:
        if sampler is not None:
            sampler.stop()
        if trainer is not None:
            trainer.close()
        run.finish(exit_code, trainer.step if trainer is not None else None, report=lambda: report_files(run_dir))
        train.close()
        if remote is not None:
            remote.close(exit_code)  # the last upload: bounded unless the run finished


def report_files(run_dir: RunDir) -> list[Path]:
    """`prefix report`'s figures and summary in `<run dir>/report/`: what the trackers keep of a finished run.

    Run as the command (a process of its own: the daemon imports nothing from prefix/tools/)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "prefix.cli", "report", run_dir.path.name, "--runs-root",
                           str(run_dir.path.parent)], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"prefix report exited {done.returncode}: {done.stderr.strip()[-300:]}")
    return [Path(line) for line in done.stdout.splitlines() if line.strip()]


def run(args: argparse.Namespace) -> int:
    """One start of a run (every rank): `prefix train` and `python -m prefix.train` both come here."""
    if args.print_config:  # touches nothing: no logging set-up, no signal handlers, no process group
        from prefix import config
        from prefix.config.doc import describe

        print(describe(config.load(args.config, args.overrides)), end="")
        return 0
    from prefix import distributed
    from prefix.preemption import default_actions
    from prefix.telemetry import setup_logging

    rank = int(os.environ.get("RANK", "0")) if os.environ.get("RANK", "0").isdigit() else 0
    setup_logging(rank)
    default_actions()
    try:
        return train(args)
    except UserError as e:
        return report(e, quiet=rank != 0 and e.same_on_every_rank)
    except Exception as e:
        if not distributed.peer_lost(e):
            raise
        return lost_peer(e, rank)
    finally:
        distributed.shutdown()


def lost_peer(error: Exception, rank: int) -> int:
    """A collective gave up on a peer: one line, and the hang's exit code, which a Job retries."""
    import sys

    import structlog

    from prefix import distributed
    from prefix.watchdog import EXIT_HUNG

    seconds = distributed.timeout().total_seconds()
    said = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    structlog.get_logger().error("a peer did not answer; exiting", timeout_s=seconds, error=said, exit_code=EXIT_HUNG)
    print(f"error: rank {rank}: a peer did not answer within distributed.timeout_s={seconds:g} s (a frozen, "
          f"partitioned or lost node: {said[:200]}); exiting {EXIT_HUNG} so the job restarts from the last "
          "checkpoint", file=sys.stderr, flush=True)
    return EXIT_HUNG


def main(argv: list[str] | None = None) -> int:
    from prefix.cli import command_parser, parse

    return exit_code_of(run, parse(command_parser("python -m prefix.train", __doc__, arguments), argv))


if __name__ == "__main__":
    from prefix.preemption import exit_promptly

    exit_promptly(main())  # an unexpected error raises out of main() instead, with the usual teardown
