"""The step loop: micro-batches → optimizer step → log / evaluate / checkpoint → agree to stop?

The trainer owns the model, optimizer and schedule; it calls the checkpointer, the preemption
flag and the metrics writer without knowing how they work.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import AbstractContextManager
from functools import partial
from typing import Any

import torch

from prefix import distributed, sharding
from prefix.appender import Appender, log_report
from prefix.checkpoint import Checkpointer, SaveResult, rng_state
from prefix.checkpoint.interval import AutoInterval
from prefix.checkpoint.policy import Boundary, Save
from prefix.config import Config
from prefix.data.loader import TrainStream, ValStream
from prefix.data.tokenizers import Tokenizer
from prefix.distributed import World
from prefix.errors import UserError
from prefix.fast_path import autocast, autocast_dtype, wants_compile, wrap
from prefix.model import GPT, complete, peak_flops
from prefix.optim import build_optimizer, lr_factor
from prefix.preemption import EXIT_PREEMPTED, Preemption
from prefix.runs import read_jsonl
from prefix.runs.goodput import Ledger, working_seconds
from prefix.runs.manager import RunManager
from prefix.state import TrainState
from prefix.telemetry import Progress
from prefix.watchdog import Watchdog


class TrainingFailed(UserError):
    """Every rank stops at the same step for the same reason (the decision is global)."""

    same_on_every_rank = True


class Trainer:
    def __init__(self, cfg: Config, world: World, model: GPT, train: TrainStream, val: ValStream | None,
                 tokenizer: Tokenizer | None, checkpointer: Checkpointer, preemption: Preemption,
                 run: RunManager, log: Any):
        t = cfg.trainer
        self.cfg, self.world, self.raw = cfg, world, model  # raw: the plain GPT, whose state is checkpointed
        model.activation_checkpointing = t.activation_checkpointing
        self.amp_dtype = autocast_dtype(t.precision, world.device)
        self.compiled = wants_compile(t.compile, world.device)
        # FSDP: `model` came sharded (and its blocks compiled) from sharding.build; it is its own wrapper.
        self.sharded = sharding.is_sharded(model)
        self.model = model if self.sharded else wrap(model, world, self.compiled)
        self.optimizer = build_optimizer(model, t)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, partial(lr_factor, t=t))
        self.train, self.val, self.tokenizer = train, val, tokenizer
        self.checkpointer, self.preemption = checkpointer, preemption
        self.run = run
        run_dir = run.dir
        self.peak_flops = peak_flops(world.device)
        self.ledger = Ledger(partial(run.log_metrics, "time"), restart=run.state.get("restarts", 0),
                             lease_wait_s=run.lease_wait_s)
        # the sample audit (every rank): through an Appender, so a full volume costs lines, never the run
        self.samples = Appender("samples", log_report(log), before_write=run.guard) \
            if cfg.data.record_samples else None
        self.samples_file = run_dir.metrics / f"samples_rank{world.rank}.jsonl"
        self.log = log
        self.accum = train.accum
        self.step = 0
        self.tokens_seen = 0
        self.grad_norm = torch.zeros(())
        self.skipped_steps = 0  # updates skipped for a non-finite loss, over the whole run
        self.skips_in_a_row = 0
        self.clock = time.perf_counter  # what throughput is measured with (a test may step it by hand)
        self._last_log = (self.clock(), 0, 0)
        self.data_wait = 0.0  # seconds spent waiting for batches since the last log line
        # watchdog: hang detection on every rank, heartbeat file on rank 0 (prefix/watchdog.py)
        self.watchdog = Watchdog(cfg.watchdog.timeout_s, run_dir.logs, world.rank, log)
        self.watchdog.before_write = run.guard  # the heartbeat: only while this start holds the run
        self.interval: AutoInterval | None = None  # with checkpoint.every_seconds: auto
        if world.is_main:
            log.info("fast path", device=str(world.device), precision="bf16" if self.amp_dtype else "fp32",
                     parallelism=t.parallelism,
                     compile=self.compiled, fused_adamw=bool(self.optimizer.param_groups[0].get("fused")),
                     activation_checkpointing=t.activation_checkpointing)

    def autocast(self) -> AbstractContextManager:
        return autocast(self.amp_dtype, self.world.device)

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What the checkpointer writes: a TrainState as plain data (called when a save takes its snapshot).
        Sharded, the model and optimizer go to the checkpoint's DCP folder instead (`shards`)."""
        whole = not self.sharded
        return TrainState(
            model=self.raw.state_dict() if whole else None, optimizer=self.optimizer.state_dict() if whole else None,
            scheduler=self.scheduler.state_dict(),
            step=self.step, tokens_seen=self.tokens_seen, config=self.cfg.to_dict(),
            dataloader=self.train.state_dict(), skipped_steps=self.skipped_steps).to_dict()

    def shards(self) -> dict[str, Any]:
        """The sharded model and optimizer state (FSDP), for the checkpoint's DCP folder."""
        return sharding.state(self.raw, self.optimizer)

    def load_state_dict(self, state: TrainState) -> None:
        if bool(state.sharded) != self.sharded:
            kinds = ("ddp", "fsdp") if self.sharded else ("fsdp", "ddp")
            raise TrainingFailed(f"trainer.parallelism: the checkpoint of step {state.step} was written with "
                                 f"{kinds[0]} and this start asks for {kinds[1]}; restore trainer.parallelism="
                                 f"{kinds[0]}, or `prefix export` the run and start a new one from it with "
                                 "model.init_from")
        configured = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        # torch places AdamW's `step` counts by the saved groups' `fused` flag (on the GPU when fused, else
        # as saved); load them as this run steps, so a CPU checkpoint resumes fused on a GPU and back.
        fused = configured[0].get("fused")
        if self.sharded:
            shards = sharding.state(self.raw, self.optimizer)
            self.checkpointer.read_shards(state.sharded, shards)  # DCP: resharded if the world size changed
            shards["optimizer"]["param_groups"] = [{**g, "fused": fused} for g in shards["optimizer"]["param_groups"]]
            sharding.load(self.raw, self.optimizer, shards)
        else:
            try:
                self.raw.load_state_dict(state.model)
            except RuntimeError as e:
                first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
                raise TrainingFailed(f"model: the checkpoint's weights do not fit this model ({first}); "
                                     "restore the model.* values or start a new --run-name") from None
            saved = state.optimizer
            self.optimizer.load_state_dict(
                {**saved, "param_groups": [{**g, "fused": fused} for g in saved["param_groups"]]})
        self.scheduler.load_state_dict(state.scheduler)
        # The config's hyperparameters win over the checkpoint's, so an accepted change (lr, betas,
        # weight decay, schedule) takes effect; with an unchanged config this recomputes the same lr.
        for group, hyper in zip(self.optimizer.param_groups, configured, strict=True):
            group.update(hyper)
        self.scheduler.base_lrs = [hyper["initial_lr"] for hyper in configured]
        for group, base, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                       self.scheduler.lr_lambdas, strict=True):
            group["lr"] = base * factor(self.scheduler.last_epoch)
        self.step, self.tokens_seen, self.skipped_steps = state.step, state.tokens_seen, state.skipped_steps
        if state.dataloader is not None:
            self.train.load_state_dict(state.dataloader)

    def save(self, plan: Save) -> None:
        """Carry out the policy's save: a periodic one in the background, the final one synchronously."""
        ck = self.checkpointer
        shards = self.shards if self.sharded else None
        if plan.background:
            ck.start(self.step, self.state_dict, {"rng": rng_state()}, shards)
            self.log.debug("checkpoint write started", step=self.step)
        else:
            self.report(ck.save(self.step, self.state_dict, {"rng": rng_state()}, plan.final, shards), plan.final)

    def conclude(self) -> None:
        """Record and commit the write in flight (collective; waits for this rank's writer)."""
        self.report(self.checkpointer.finish(), final=False)

    def report(self, result: SaveResult, final: bool) -> None:
        """A failed periodic save is retried at the next interval; a failed final save ends the run."""
        self.run.log_metrics("checkpoint", result.step, {
            "stall_s": result.stall_s, "write_s": result.write_s, "bytes": result.bytes,
            "async": result.background, "ok": result.error is None, "skipped": result.skipped})
        if result.error is None:
            self.log.info("checkpoint saved", step=result.step, stall_s=round(result.stall_s, 3),
                          write_s=round(result.write_s, 3), background=result.background, skipped=result.skipped)
            if self.interval is not None:
                self.interval.observe(result.stall_s)
                self.checkpointer.every_seconds = self.interval.seconds()
            return
        where = self.checkpointer.resume_point()
        if final:
            raise TrainingFailed(f"checkpoint: the final save at step {result.step} failed ({result.error}); "
                                 f"a restart resumes from {where}; free space on (or repair) the volume of "
                                 f"{self.checkpointer.folder} and restart")
        self.log.warning("checkpoint failed; training goes on and retries at the next interval",
                         step=result.step, error=result.error, restart_resumes_from=where)

    def choose_interval(self) -> None:
        """`checkpoint.every_seconds: auto`: rank 0 reads the run's history; every rank uses its choice."""
        c = self.cfg.checkpoint
        if c.every_seconds != "auto":
            return
        metrics = self.run.dir.metrics
        self.interval = distributed.on_main(self.world, lambda: AutoInterval.of(
            c.min_seconds, c.max_seconds, self.run.dir.starts(), read_jsonl(metrics / "checkpoint.jsonl"),
            working_seconds(metrics)))
        self.checkpointer.every_seconds = self.interval.seconds()
        self.log.info("checkpoint interval (auto, Young-Daly)", **self.interval.inputs())

    # -- loop -----------------------------------------------------------------------------
    def fit(self) -> int:
        """Train to max_steps (exit 0) or until the ranks agree to stop (exit 143)."""
        self.watchdog.start(self.step)  # armed before the first step: a hang in it is caught too
        self.ledger.opened(self.step)
        self._last_log = (self.clock(), self.tokens_seen, self.step)  # throughput of this start only
        self.choose_interval()
        self.progress = Progress(self.cfg.telemetry.progress, self.world.is_main, self.cfg.trainer.max_steps, self.step)
        try:
            return self._loop()
        finally:
            self.progress.close()
            self.ledger.flush(self.step)

    def _loop(self) -> int:
        t, ck = self.cfg.trainer, self.checkpointer
        with self.preemption.armed():
            while True:
                # One small all-reduce per step: a signal anywhere, the time-based interval, a write still running.
                stop, time_due, writing = distributed.any_true(self.world, self.preemption.requested,
                                                               ck.seconds_due(), ck.busy)
                at = partial(Boundary, step=self.step, max_steps=t.max_steps, stop=stop, time_due=time_due,
                             writing=writing, steps_due=ck.steps_due(self.step), kept=ck.keeps(self.step),
                             asynchronous=self.cfg.checkpoint.asynchronous)
                if at(in_flight=ck.in_flight, committed=ck.committed_step).commit():
                    with self.ledger.spend("checkpoint"):
                        self.conclude()  # written everywhere, or the final flush must wait for it
                boundary = at(in_flight=ck.in_flight, committed=ck.committed_step, owed=ck.owed)
                if boundary.skip():  # the loop never waits for a periodic write: the save is owed instead
                    ck.skip()
                    self.log.debug("checkpoint save skipped: the previous write is in flight", step=self.step,
                                   writing=ck.in_flight)
                if (plan := boundary.save()) is not None:
                    with self.ledger.spend("checkpoint"):
                        self.save(plan)
                if boundary.outcome() == "stop":
                    self.log.warning("stopped by signal after final checkpoint", step=self.step)
                    return EXIT_PREEMPTED
                if boundary.outcome() == "finish":
                    break
                with self.ledger.spend("train"):
                    loss = self.train_step()
                self.watchdog.beat(self.step)
                self.progress.update(self.step)
                if self.step % t.log_every == 0 or self.step == t.max_steps:
                    self.log_step(loss)
                    self.ledger.flush(self.step)
                if t.eval_every and self.val and (self.step % t.eval_every == 0 or self.step == t.max_steps):
                    with self.ledger.spend("eval"):
                        self.evaluate()
                if t.sample_every and self.step % t.sample_every == 0 and self.samples_here:
                    with self.ledger.spend("eval"):
                        for prompt in t.sample_prompts or [t.sample_prompt]:
                            text = self.generate(prompt, t.sample_tokens)
                            if self.world.is_main:
                                self.run.log_metrics("samples", self.step, {"prompt": prompt, "text": text})
        self.watchdog.stop()  # the sample below is no step; a hang after this is torchrun's to handle
        self.progress.close()
        self.log.info("training finished", step=self.step, tokens_seen=self.tokens_seen)
        if t.sample_tokens and self.world.is_main and self.tokenizer is None:
            self.log.warning("no sample: the dataset does not say which tokenizer made it")
        elif t.sample_tokens and self.samples_here:
            text = self.generate(t.sample_prompt, t.sample_tokens)
            if self.world.is_main:
                self.log.debug("sample", text=text)  # JSON log only; people get it verbatim below
                print(f"--- sample from the trained model ---\n{text}\n---", flush=True)
        return 0

    def train_step(self) -> torch.Tensor:
        device, loss_sum, indices = self.world.device, torch.zeros((), device=self.world.device), []
        for micro in range(self.accum):
            waited = self.clock()
            batch = self.train.next()
            self.data_wait += self.clock() - waited
            last = micro == self.accum - 1
            with sharding.gradient_sync(self.model, last):
                with self.autocast():
                    _, loss = self.model(batch.inputs.to(device, non_blocking=True),
                                         batch.targets.to(device, non_blocking=True))
                (loss / self.accum).backward()
            loss_sum += loss.detach()
            if self.samples:
                indices += batch.index.tolist()
        clip = self.cfg.trainer.grad_clip or float("inf")
        self.grad_norm = sharding.clip_gradients(self.raw, clip)
        if self.finite(loss_sum):
            self.checkpointer.before_update()  # an asynchronous save copies the state until here
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += self.cfg.trainer.global_batch_size * self.cfg.model.seq_len
        if self.samples:
            self.samples.append(self.samples_file, json.dumps({"step": self.step, "epoch": self.train.epoch,
                                                               "indices": indices, "lease_epoch": self.run.lease_epoch}))
        return loss_sum / self.accum

    def finite(self, loss: torch.Tensor) -> bool:
        """False skips this step's update; raises after too many in a row (or at once with `stop`).

        The gradient norm is computed from the all-reduced gradients, so every rank decides alike;
        a NaN loss on any rank makes it NaN everywhere. Nothing is saved on the way out: the last
        checkpoint stays the last good one.
        """
        if torch.isfinite(self.grad_norm):
            self.skips_in_a_row = 0
            return True
        t = self.cfg.trainer
        self.skips_in_a_row += 1
        self.skipped_steps += 1
        step = self.step + 1
        if t.on_nonfinite == "stop" or self.skips_in_a_row > t.max_consecutive_skips:
            raise TrainingFailed(
                f"trainer: the loss or gradient was not finite at step {step} ({self.skips_in_a_row} step(s) in a row, "
                f"trainer.on_nonfinite={t.on_nonfinite}); stopped without saving, so a restart resumes from "
                f"{self.checkpointer.resume_point()}; lower trainer.lr or check the data")
        self.log.warning("non-finite loss or gradient; update skipped", step=step, loss=float(loss / self.accum),
                         grad_norm=float(self.grad_norm), in_a_row=self.skips_in_a_row)
        return False

    def log_step(self, loss: torch.Tensor) -> None:
        (loss_total,) = distributed.all_sum(self.world, [loss.item()])
        now, tokens = self.clock(), self.tokens_seen
        last_time, last_tokens, last_step = self._last_log
        self._last_log = (now, tokens, self.step)
        elapsed, steps = max(now - last_time, 1e-9), max(self.step - last_step, 1)
        values = {"loss": loss_total / self.world.world_size, "lr": self.optimizer.param_groups[0]["lr"],
                  "grad_norm": float(self.grad_norm), "tokens_seen": tokens, "skipped_steps": self.skipped_steps,
                  "tokens_per_sec": (tokens - last_tokens) / elapsed,
                  "step_time": elapsed / steps, "data_wait": self.data_wait / steps}
        if self.peak_flops:  # model FLOPs utilisation, where the GPU's peak is known
            values["mfu"] = values["tokens_per_sec"] * self.raw.flops_per_token() / (self.peak_flops * self.world.world_size)
        self.data_wait = 0.0
        self.run.log_metrics("train", self.step, values)
        self.progress.update(self.step, loss=f"{values['loss']:.4f}", tok_s=round(values["tokens_per_sec"]))
        self.log.info("step", step=self.step, loss=round(values["loss"], 4), lr=f"{values['lr']:.2e}",
                      tok_s=round(values["tokens_per_sec"]),
                      data_wait_pct=round(100 * values["data_wait"] / values["step_time"], 2))

    @torch.no_grad()
    def evaluate(self) -> None:
        """Validation loss over this rank's eval batches, averaged over all ranks; bits per byte."""
        self.raw.eval()
        total, count = 0.0, 0
        for batch in self.val:
            with self.autocast():
                _, loss = self.raw(batch.inputs.to(self.world.device), batch.targets.to(self.world.device))
            total += loss.item() * batch.targets.numel()
            count += batch.targets.numel()
        self.raw.train()
        total, count = distributed.all_sum(self.world, [total, count])
        val_loss = total / max(count, 1)
        extra = {}
        if self.tokenizer is not None and self.tokenizer.kind == "bytes":  # one token per byte (EOD too)
            extra["val_bpb"] = val_loss / math.log(2)
        self.run.log_metrics("eval", self.step, {"val_loss": val_loss, **extra})
        self.log.info("eval", step=self.step, val_loss=round(val_loss, 4), **{k: round(v, 4) for k, v in extra.items()})

    @property
    def samples_here(self) -> bool:
        """Whether this rank generates the samples: rank 0, or every rank when sharded (each forward of a
        sharded model is a collective: rank 0 alone would wait for the others until the timeout)."""
        return self.tokenizer is not None and (self.world.is_main or self.sharded)

    def generate(self, prompt: str, tokens: int) -> str:
        return complete(self.raw, self.tokenizer, prompt, tokens, self.cfg.run.seed, self.world.device)

    def close(self) -> None:
        self.watchdog.stop()  # every exit (0, 143, a UserError, a crash) ends the watch here at the latest
        self.checkpointer.close()  # an error left a write in flight: let it end, remove its files
        if self.samples:
            self.samples.close()
