"""The step loop every job shares: resume, step, log, checkpoint, and stop cleanly.

A job is any object with ``step(step) -> StepResult``, ``state_dict()``/``load_state_dict()``
for what it must carry across a restart (data position, KL controller) and ``initialize()`` for
a fresh start (initial weights); it may add ``start(resumed)`` and ``finish()``, each returning
metrics to log. The loop owns everything else: checkpoints of all the job's trained models
together, signals, NaN/Inf accounting (docs/algorithm.md §2, "Non-finite updates"), progress.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import yaml

from megatron_dvpo import distributed
from megatron_dvpo.checkpointing import CheckpointManager, find_latest_checkpoint
from megatron_dvpo.config import ConfigError, RunConfig, to_dict
from megatron_dvpo.logging import MetricsLogger, peak_memory_gib
from megatron_dvpo.model_state import model_state_metrics
from megatron_dvpo.models.gpt import training_flops_per_token
from megatron_dvpo.perf import dense_bf16_peak_tflops, model_flops_utilization
from megatron_dvpo.training.trained_model import UpdateResult, schedule_settings

# Each makes a job finish its step, save and exit cleanly (Ctrl-C as a preemption does).
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
DUPLICATE_SIGNAL_S = 2.0  # a signal again within this is the same one, delivered twice


class StoppedRun(RuntimeError):
    """A job asked to stop (e.g. ``rl.stop_on_gaming``); the checkpoint of the step is saved."""


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a NaN or Inf loss, gradient or metric."""


@dataclass
class StepResult:
    """What one step did: metrics to log, and every optimizer update it attempted."""

    metrics: dict[str, float]
    updates: list[UpdateResult] = field(default_factory=list)
    stop: Optional[str] = None  # why the run must stop after this step (it saves first)


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


class TrainingLoop:
    """Runs a job for ``cfg.train_steps`` steps; ``units`` are its trained models by name (the
    main one ``model``), checkpointed together."""

    def __init__(self, cfg: RunConfig, job, units: dict):
        self.cfg, self.job, self.units = cfg, job, units
        self.checkpoints = CheckpointManager(cfg.checkpoint, units,
                                             lambda: yaml.safe_dump(to_dict(cfg), sort_keys=False))
        tensorboard = cfg.logging.tensorboard_dir or str(Path(cfg.logging.run_dir) / "tensorboard")
        self.logger = MetricsLogger(tensorboard, cfg.train_steps, enabled=distributed.is_rank0())
        self.step = 0
        self.skipped_steps = 0  # steps none of whose updates was applied (non-finite values)
        self.skipped_updates = 0  # updates skipped for a non-finite loss or gradient
        self._bad_in_a_row = 0
        self._signal: int | None = None
        self._signal_time = 0.0
        self.peak_tflops = cfg.logging.peak_tflops or dense_bf16_peak_tflops()
        # the trained sequences' length: the job's (an RL job's prompt + response) or the data's
        self.flops_per_token = training_flops_per_token(
            cfg.model, getattr(job, "sequence_length", cfg.data.seq_length))

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps, "skipped_updates": self.skipped_updates,
                **self.job.state_dict()}

    def resume(self) -> bool:
        """Continue from the latest complete checkpoint, else start the job afresh."""
        latest = self.checkpoints.latest()
        if latest is None:
            self.job.initialize()
            return False
        state = self.checkpoints.restore(latest)
        self.step = state["step"]
        self.skipped_steps = state.get("skipped_steps", 0)
        self.skipped_updates = state.get("skipped_updates", 0)
        self.job.load_state_dict(state)
        distributed.print_rank0(f"resumed from {latest} at step {self.step}")
        return True

    def save(self) -> None:
        path = self.checkpoints.save(self.step, self.state_dict())
        if path is not None:
            distributed.print_rank0(f"saved {path}")

    # -- accounting -------------------------------------------------------------------------
    def _account(self, result: StepResult) -> None:
        """Count skipped updates and steps; stop after ``max_bad_steps`` bad steps in a row."""
        non_finite = [u for u in result.updates if u.non_finite]
        bad_metrics = [tag for tag, v in result.metrics.items() if not math.isfinite(v)]
        self.skipped_updates += len(non_finite)
        if non_finite and not any(u.applied for u in result.updates):
            self.skipped_steps += 1
        if not (non_finite or bad_metrics):
            self._bad_in_a_row = 0
            return
        self._bad_in_a_row += 1
        reason = (f"{len(non_finite)} of {len(result.updates)} updates skipped for a NaN/Inf "
                  "loss or gradient" if non_finite else f"a non-finite {bad_metrics[0]}")
        distributed.print_rank0(f"step {self.step}: {reason} ({self._bad_in_a_row} bad steps "
                                f"in a row, {self.skipped_updates} updates skipped in all)")
        if self._bad_in_a_row >= self.cfg.max_bad_steps:
            raise NonFiniteError(f"stopping at step {self.step}: {self._bad_in_a_row} consecutive "
                                 f"bad steps, the last with {reason} (max_bad_steps="
                                 f"{self.cfg.max_bad_steps}); the last checkpoint is the last "
                                 "good state")

    # -- signals ----------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        """Acted on between steps, never inside one. A second Ctrl-C interrupts at once, but
        not the copy the launcher forwards right after the terminal's own."""
        now = time.monotonic()
        if (signum == signal.SIGINT and self._signal == signal.SIGINT
                and now - self._signal_time > DUPLICATE_SIGNAL_S):
            raise KeyboardInterrupt
        if self._signal is None:
            self._signal, self._signal_time = signum, now

    def _stop_requested(self) -> int:
        """The signal any rank received (0 if none), agreed by all ranks."""
        return int(distributed.all_reduce_max(float(self._signal or 0)))

    def _stop_for_signal(self, signum: int) -> None:
        """Save, requeue the Slurm job on SIGUSR1 (the --signal warning), and stop cleanly."""
        self.save()
        name = signal.Signals(signum).name
        distributed.print_rank0(f"{name} received: saved step {self.step}, exiting; a restart "
                                "resumes here")
        job = os.environ.get("SLURM_JOB_ID")
        if signum == signal.SIGUSR1 and job and distributed.is_rank0():
            subprocess.run(["scontrol", "requeue", job], check=False)

    # -- the loop ---------------------------------------------------------------------------
    def _log(self, metrics: dict[str, float]) -> None:
        if self.step % self.cfg.logging.log_interval == 0 or self.step == 1:
            self.logger.log(self.step, metrics, self.job.summary_tags + ("perf/step_time_s",))

    def _log_now(self, metrics: dict[str, float]) -> None:
        if metrics:
            self.logger.log(self.step, metrics, self.job.summary_tags)

    def run(self) -> None:
        previous = {signum: signal.signal(signum, self._on_signal) for signum in STOP_SIGNALS}
        try:
            resumed = self.resume()
            if hasattr(self.job, "start"):
                self._log_now(self.job.start(resumed))
            self._steps()
        finally:
            self.logger.close()
            for signum, handler in previous.items():  # the caller's, e.g. a test runner's
                signal.signal(signum, handler)

    def _steps(self) -> None:
        interval = self.cfg.checkpoint.save_interval
        while self.step < self.cfg.train_steps:
            start = time.perf_counter()
            result = self.job.step(self.step)
            self.step += 1
            self._account(result)
            metrics = {**result.metrics, "train/skipped_steps": float(self.skipped_steps),
                       "train/skipped_updates": float(self.skipped_updates),
                       "perf/step_time_s": time.perf_counter() - start,
                       "perf/peak_mem_gib": peak_memory_gib(),
                       # the models the job holds: trained units and frozen ones
                       **model_state_metrics(self.units, getattr(self.job, "frozen_models", {}))}
            if self.peak_tflops and "perf/train_tokens_per_s" in metrics:
                metrics["perf/mfu"] = model_flops_utilization(
                    metrics["perf/train_tokens_per_s"], self.flops_per_token,
                    torch.distributed.get_world_size(), self.peak_tflops)
            self._log(metrics)
            if result.stop:
                self.save()
                raise StoppedRun(f"stopped at step {self.step}, saved: {result.stop}")
            if self.step >= self.cfg.train_steps:
                break
            signum = self._stop_requested()
            if signum:
                self._stop_for_signal(signum)
                return
            if self.cfg.exit_interval and self.step % self.cfg.exit_interval == 0:
                self.save()
                distributed.print_rank0(f"exit_interval={self.cfg.exit_interval}: stopping at "
                                        f"step {self.step}; a restart resumes from here")
                return
            if interval and self.step % interval == 0:
                self.save()
        self.save()
        if hasattr(self.job, "finish"):
            self._log_now(self.job.finish())
