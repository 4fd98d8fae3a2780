"""What every trainer shares: DDP, optimizer, LR schedule, and the resume/step/save loop."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch
import yaml
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer

from megatron_dvpo.checkpointing import (find_latest_checkpoint, load_model,
                                         load_training_checkpoint, save_training_checkpoint)
from megatron_dvpo.config import (ConfigError, OptimizerConfig, ParallelConfig, PrecisionConfig,
                                  RunConfig, load_config, to_dict, validate)
from megatron_dvpo.data.sampler import DistributedBatchSampler
from megatron_dvpo.distributed import (init_distributed, is_rank0, launch_env, print_rank0,
                                       shutdown)
from megatron_dvpo.errors import input_errors_exit
from megatron_dvpo.logging import MetricsLogger, peak_memory_gib
from megatron_dvpo.models.forward import run_microbatches
from megatron_dvpo.models.gpt import DTYPES
from megatron_dvpo.models.precision import Hardware, plan_precision


def wrap_ddp(chunks: list[torch.nn.Module], parallel: ParallelConfig) -> list[DistributedDataParallel]:
    """Megatron DDP around each chunk; gradients land in ``param.main_grad`` (fp32).

    The schedule then calls ``finalize_model_grads`` after the last microbatch: the DP reduction,
    plus the all-reduce of tied embedding gradients between the first and last pipeline stages.
    """
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        # FP8 parameters (precision.fp8_param_gather): the optimizer's updated shards are
        # quantized and all-gathered in FP8.
        fp8_param_gather=chunks[0].config.fp8_param,
    )
    wrapped = [DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk,
                                       disable_bucketing=i > 0)
               for i, chunk in enumerate(chunks)]
    config = chunks[0].config
    config.no_sync_func = ([w.no_sync for w in wrapped] if len(wrapped) > 1
                           else wrapped[0].no_sync)
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped


def build_optimizer(chunks: list[DistributedDataParallel], optim: OptimizerConfig,
                    parallel: ParallelConfig, precision: PrecisionConfig):
    dtype = DTYPES[precision.params_dtype]
    model_config = chunks[0].config
    config = MegatronOptimizerConfig(
        optimizer=optim.optimizer,
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        fp8_recipe=model_config.fp8_recipe if model_config.fp8 else None,
    )
    return get_megatron_optimizer(config, chunks)


def schedule_settings(optim: OptimizerConfig, total_updates: int) -> dict:
    """megatron's LR/weight-decay schedule for ``total_updates`` optimizer steps: linear warmup
    from 0, then the configured decay. Also what a resumed run is checked against."""
    decay_steps = max(total_updates, optim.lr_warmup_steps + 1)
    return dict(init_lr=0.0, max_lr=optim.lr, min_lr=optim.min_lr,
                lr_warmup_steps=optim.lr_warmup_steps, lr_decay_steps=decay_steps,
                lr_decay_style=optim.lr_decay_style, start_wd=optim.weight_decay,
                end_wd=optim.weight_decay, wd_incr_steps=decay_steps, wd_incr_style="constant")


def build_scheduler(optimizer, optim: OptimizerConfig, total_updates: int,
                    override: bool = False):
    """The schedule of ``schedule_settings``. On resume megatron asserts that a checkpoint's
    schedule equals this one, unless ``override`` (checkpoint.override_scheduler) makes this
    config's values win, as Megatron-LM's --override-opt_param-scheduler does."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(optimizer, **schedule_settings(optim, total_updates),
                                   use_checkpoint_opt_param_scheduler=False,
                                   override_opt_param_scheduler=override)


# The config key behind each value of a saved schedule, for the resume check's message.
SCHEDULE_KEYS = {"max_lr": "optimizer.lr", "min_lr": "optimizer.min_lr",
                 "lr_warmup_steps": "optimizer.lr_warmup_steps",
                 "lr_decay_steps": "train_steps (x optimizer steps per step)",
                 "lr_decay_style": "optimizer.lr_decay_style",
                 "start_wd": "optimizer.weight_decay"}


def check_resume_schedule(cfg: RunConfig, updates_per_step: int) -> None:
    """A run that resumes must ask for the schedule its checkpoint was made with (or say
    checkpoint.override_scheduler=true): otherwise config.yaml would record values the run does
    not use."""
    ckpt = cfg.checkpoint
    resume_dir = ckpt.load_dir or ckpt.save_dir
    latest = find_latest_checkpoint(resume_dir) if resume_dir else None
    if latest is None or ckpt.override_scheduler:
        return
    saved = json.loads((latest / "train_state.json").read_text()).get("scheduler") or {}
    wanted = schedule_settings(cfg.optimizer, cfg.train_steps * updates_per_step)
    keys = [k for k in SCHEDULE_KEYS if k in saved and saved[k] != wanted[k]]
    if wanted["lr_decay_style"] == saved.get("lr_decay_style") == "constant":
        keys = [k for k in keys if k != "lr_decay_steps"]  # a constant LR has no decay length
    diffs = [f"{SCHEDULE_KEYS[k]}: {wanted[k]!r} here, {saved[k]!r} in the checkpoint"
             for k in keys]
    if diffs:
        raise ConfigError(f"resuming from {latest} with a different LR schedule ("
                          f"{'; '.join(diffs)}); restore those values, or set "
                          "checkpoint.override_scheduler=true to continue with this config's")


# Each makes a trainer finish its step, save and exit cleanly (Ctrl-C as a preemption does).
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a NaN or Inf loss or gradient."""


class Trainer:
    """The loop every job shares: resume, step, log, checkpoint.

    Subclasses implement ``train_step() -> metrics`` (using ``train_batch`` for the optimizer
    step) and may keep extra resumable state through ``extra_state``/``load_extra_state``.
    """

    summary_tags: tuple[str, ...] = ()
    init_skip: tuple[str, ...] = ()  # parameters checkpoint.init_from does not provide

    @staticmethod
    def updates_per_step(cfg: RunConfig) -> int:
        """Optimizer steps per training step: what the LR schedule counts."""
        return 1

    def __init__(self, cfg: RunConfig, chunks: list[torch.nn.Module]):
        self.cfg = cfg
        self.chunks = chunks
        self.ddp = wrap_ddp(chunks, cfg.parallel)
        self.optimizer = build_optimizer(self.ddp, cfg.optimizer, cfg.parallel, cfg.precision)
        self.scheduler = build_scheduler(self.optimizer, cfg.optimizer,
                                         cfg.train_steps * self.updates_per_step(cfg),
                                         cfg.checkpoint.override_scheduler)
        self.step = 0
        self.consumed_samples = 0  # the data position: samples of all global batches so far
        self._batches = None
        self.skipped_steps = 0  # steps skipped for a non-finite loss or gradient
        self._bad_in_a_row = 0
        self._bad_reason: str | None = None
        self._signal: int | None = None
        tensorboard = cfg.logging.tensorboard_dir or str(Path(cfg.logging.run_dir) / "tensorboard")
        self.logger = MetricsLogger(tensorboard, cfg.train_steps, enabled=is_rank0())

    # -- state ------------------------------------------------------------------------------
    def extra_state(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "skipped_steps": self.skipped_steps}

    def load_extra_state(self, state: dict) -> None:
        self.consumed_samples = state["consumed_samples"]
        self.skipped_steps = state.get("skipped_steps", 0)

    def next_indices(self, num_samples: int) -> list[int]:
        """This data-parallel rank's share of the next global batch of a dataset.

        The sampler is built on first use, after a resume has restored the data position, so a
        restarted run sees exactly the batches an unbroken one would have.
        """
        if self._batches is None:
            self._sampler = DistributedBatchSampler(
                num_samples, self.cfg.data.global_batch_size,
                parallel_state.get_data_parallel_rank(),
                parallel_state.get_data_parallel_world_size(), self.cfg.seed,
                consumed_samples=self.consumed_samples)
            self._batches = iter(self._sampler)
        indices = next(self._batches)
        self.consumed_samples = self._sampler.consumed_samples
        return indices

    def resume(self) -> bool:
        """Continue from the latest complete checkpoint, else start from ``init_from`` weights."""
        ckpt = self.cfg.checkpoint
        resume_dir = ckpt.load_dir or ckpt.save_dir
        latest = find_latest_checkpoint(resume_dir) if resume_dir else None
        if latest is not None:
            state = load_training_checkpoint(latest, self.chunks, self.optimizer, self.scheduler,
                                             ckpt.optimizer_sharding)
            self.step = state["step"]
            self.load_extra_state(state)
            print_rank0(f"resumed from {latest} at step {self.step}")
            return True
        if ckpt.init_from:
            load_model(self.chunks, Path(ckpt.init_from) / "model", self.init_skip)
            print_rank0(f"initialised weights from {ckpt.init_from}")
        return False

    def save(self) -> None:
        if not self.cfg.checkpoint.save_dir:
            return
        config_yaml = yaml.safe_dump(to_dict(self.cfg), sort_keys=False)
        path = save_training_checkpoint(self.cfg.checkpoint.save_dir, self.step, self.chunks,
                                        self.optimizer, self.scheduler, self.extra_state(),
                                        config_yaml, self.cfg.checkpoint.keep_last,
                                        self.cfg.checkpoint.optimizer_sharding)
        print_rank0(f"saved {path}")

    # -- steps ------------------------------------------------------------------------------
    def forward_backward(self, microbatches: list[dict], head, loss_fn) -> list[dict]:
        """Fresh gradients for ``sum(loss_fn)`` over ``microbatches`` (no optimizer step)."""
        for chunk in self.ddp:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        return run_microbatches(self.ddp, microbatches, head, loss_fn)

    def _gradients_finite(self) -> bool:
        """Whether every rank's gradients are finite (megatron checks only under fp16)."""
        bad = torch.zeros(1)
        for chunk in self.ddp:
            for param in chunk.module.parameters():
                grad = getattr(param, "main_grad", None)
                if grad is not None and not torch.isfinite(grad).all():
                    bad[0] = 1
                    break
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        return bad.item() == 0

    def optimizer_step(self) -> tuple[float, bool]:
        """One optimizer step, unless a gradient is NaN/Inf: then no update, and the step is
        marked bad."""
        if not self._gradients_finite():
            self._bad_reason = "a NaN/Inf gradient"
            return float("nan"), False
        success, grad_norm, _ = self.optimizer.step()
        if success:
            self.scheduler.step(increment=1)
        return (grad_norm or 0.0), success

    def train_batch(self, microbatches: list[dict], head, loss_fn):
        """Forward-backward over ``microbatches`` and one optimizer step."""
        outputs = self.forward_backward(microbatches, head, loss_fn)
        grad_norm, success = self.optimizer_step()
        return outputs, grad_norm, success

    def train_step(self) -> dict[str, float]:
        raise NotImplementedError

    def start(self, resumed: bool) -> None:
        """Work before the first step of a run (a baseline evaluation, say)."""

    def finish(self) -> None:
        """Work after the last step (a final evaluation, say)."""

    def _check_step(self, metrics: dict[str, float]) -> None:
        """Count a step with a non-finite gradient or metric; stop after too many in a row."""
        bad = [tag for tag, value in metrics.items() if not math.isfinite(value)]
        reason = self._bad_reason or (f"a non-finite {bad[0]}" if bad else None)
        self._bad_reason = None
        if reason is None:
            self._bad_in_a_row = 0
            return
        self.skipped_steps += 1
        self._bad_in_a_row += 1
        print_rank0(f"step {self.step}: skipped, {reason} "
                    f"({self._bad_in_a_row} in a row, {self.skipped_steps} in all)")
        if self._bad_in_a_row >= self.cfg.max_bad_steps:
            raise NonFiniteError(f"stopping at step {self.step}: {self._bad_in_a_row} consecutive "
                                 f"steps with {reason} (max_bad_steps={self.cfg.max_bad_steps}); "
                                 f"the last checkpoint is the last good state")

    def _on_signal(self, signum, frame) -> None:
        self._signal = signum  # acted on between steps, never inside one
        if signum == signal.SIGINT:  # a second Ctrl-C interrupts at once
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def _stop_requested(self) -> int:
        """The signal any rank received (0 if none), agreed by all ranks."""
        flag = torch.tensor([float(self._signal or 0)])
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    def _stop_for_signal(self, signum: int) -> None:
        """Save, requeue the Slurm job on SIGUSR1 (the --signal warning), and stop cleanly."""
        self.save()
        name = signal.Signals(signum).name
        print_rank0(f"{name} received: saved step {self.step}, exiting; a restart resumes here")
        job = os.environ.get("SLURM_JOB_ID")
        if signum == signal.SIGUSR1 and job and is_rank0():
            subprocess.run(["scontrol", "requeue", job], check=False)
        self.logger.close()

    def run(self) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_signal)
        self.start(self.resume())
        interval = self.cfg.checkpoint.save_interval
        while self.step < self.cfg.train_steps:
            start = time.perf_counter()
            metrics = self.train_step()
            self.step += 1
            self._check_step(metrics)
            metrics["train/skipped_steps"] = float(self.skipped_steps)
            metrics["perf/step_time_s"] = time.perf_counter() - start
            metrics["perf/peak_mem_gib"] = peak_memory_gib()
            if self.step % self.cfg.logging.log_interval == 0 or self.step == 1:
                self.logger.log(self.step, metrics, self.summary_tags + ("perf/step_time_s",))
            if self.step >= self.cfg.train_steps:
                break
            signum = self._stop_requested()
            if signum:
                self._stop_for_signal(signum)
                return
            if self.cfg.exit_interval and self.step % self.cfg.exit_interval == 0:
                self.save()
                print_rank0(f"exit_interval={self.cfg.exit_interval}: stopping at step "
                            f"{self.step}; a restart resumes from here")
                self.logger.close()
                return
            if interval and self.step % interval == 0:
                self.save()
        self.save()
        self.finish()
        self.logger.close()


def run_trainer(trainer_class, description: str, argv=None,
                check: Callable[[RunConfig, list[str]], None] | None = None) -> None:
    """The command line every trainer shares: ``--config FILE [key=value ...]``.

    Everything that can be checked is checked before any process group or model exists:
    the precision plan, ``check(cfg, overrides)`` (the trainer's inputs: checkpoints,
    tokenizer, data, which it may resolve into ``cfg``), the layout and a resumed run's LR
    schedule.
    Bad input ends as one ``error: ...`` line and exit status 2.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML run config")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train_steps=10")
    args = parser.parse_args(argv)
    with input_errors_exit():
        cfg = load_config(args.config, args.overrides)
        plan = plan_precision(cfg.precision, cfg.parallel, None, Hardware.detect())
        if check is not None:
            check(cfg, args.overrides)
        validate(cfg, launch_env().world_size)
        check_resume_schedule(cfg, trainer_class.updates_per_step(cfg))
    init_distributed(cfg.parallel, cfg.seed)
    print_rank0(f"precision: {cfg.precision.params_dtype} parameters, {plan.describe()}")
    with input_errors_exit():
        trainer_class(cfg).run()
    shutdown()
