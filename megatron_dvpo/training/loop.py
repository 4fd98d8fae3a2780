"""The step loop every job shares: resume, step, log, checkpoint, and stop cleanly.

A job is a ``job.Job``: ``step(step) -> StepResult``, ``state_dict()``/``load_state_dict()``
for what it must carry across a restart (data position, KL controller), ``initialize()`` for
a fresh start (initial weights), ``start(resumed)`` and ``finish()`` returning metrics to log
(``job.JobDefaults`` has the parts most jobs leave empty). The loop owns everything else:
checkpoints of all the job's trained models together (resuming from the newest intact one),
stop signals (``signals.py``), the run's health (``health.py``: NaN/Inf accounting,
divergence), progress. It never saves during a bad streak, so the newest checkpoint is always
a good one, and a stop saves exactly once.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import yaml

from megatron_dvpo import distributed
from megatron_dvpo.checkpointing import CheckpointManager
from megatron_dvpo.config import RunConfig, config_changes, scoring_model_changes, to_dict
from megatron_dvpo.logging import MetricsLogger, memory_metrics
from megatron_dvpo.model_state import model_state_metrics
from megatron_dvpo.models.gpt import training_flops_per_token
from megatron_dvpo.perf import dense_bf16_peak_tflops, model_flops_utilization
from megatron_dvpo.training.health import RunHealth, UnhealthyRun, parameters_norm
from megatron_dvpo.training.job import Job
from megatron_dvpo.training.signals import StopSignals
from megatron_dvpo.training.trained_model import UpdateResult


class StoppedRun(RuntimeError):
    """A job asked to stop (e.g. ``rl.stop_on_gaming``); the checkpoint of the step is saved."""


@dataclass
class StepResult:
    """What one step did: metrics to log, and every optimizer update it attempted."""

    metrics: dict[str, float]
    updates: list[UpdateResult] = field(default_factory=list)
    stop: Optional[str] = None  # why the run must stop after this step (it saves first)
    text: dict[str, str] = field(default_factory=dict)  # tag -> markdown (e.g. samples)
    # tag -> values, logged as a histogram with the step's metrics
    histograms: dict[str, torch.Tensor] = field(default_factory=dict)


def hparams(config: dict, prefix: str = "") -> dict:
    """The config's settings as TensorBoard's HParams tab takes them: one flat key per leaf
    that is a number, a string or a bool (paths, lists and unset keys left out)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(hparams(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float)) or (isinstance(value, str)
                                                       and "/" not in value):
            flat[f"{prefix}{key}"] = value
    return flat


class TrainingLoop:
    """Runs a job for ``cfg.train_steps`` steps; ``units`` are its trained models by name (the
    main one ``model``), checkpointed together. ``signals``: the command line's, installed
    before start-up; without them the loop handles the stop signals while it runs."""

    def __init__(self, cfg: RunConfig, job: Job, units: dict,
                 signals: StopSignals | None = None):
        self.cfg, self.job, self.units = cfg, job, units
        self.checkpoints = CheckpointManager(cfg.checkpoint, units,
                                             lambda: yaml.safe_dump(to_dict(cfg), sort_keys=False))
        self.logger = MetricsLogger(cfg.logging.events_dir, cfg.train_steps,
                                    enabled=distributed.is_rank0())
        self.step = 0
        self.health = RunHealth(cfg.max_bad_steps, cfg.divergence_factor, cfg.divergence_window,
                                cfg.divergence_grad_spikes)
        self.signals, self._own_signals = signals or StopSignals(), signals is None
        self.last_good: Path | None = None  # the newest checkpoint this run saved or resumed
        self._memory_logged = False
        self.peak_tflops = cfg.logging.peak_tflops or dense_bf16_peak_tflops()
        # the trained sequences' length: the job's (an RL job's prompt + response) or the data's
        self.flops_per_token = training_flops_per_token(cfg.model, job.sequence_length)

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {**self.health.state_dict(), **self.job.state_dict()}

    def resume(self) -> bool:
        """Continue from the newest intact checkpoint, else start the job afresh."""
        latest = self.checkpoints.latest_intact()
        if latest is None:
            self.job.initialize()
            return False
        state = self.checkpoints.restore(latest)
        self.step = state["step"]
        self.health.load_state_dict(state)
        self.job.load_state_dict(state)
        self.last_good = latest
        distributed.print_rank0(f"resumed from {latest} at step {self.step}")
        saved = yaml.safe_load((latest / "config.yaml").read_text())
        now = to_dict(self.cfg)
        for change in config_changes(saved, now):  # e.g. another rl.policy
            distributed.print_rank0(f"resume: the config differs from the checkpoint's: {change}")
        for change in scoring_model_changes(saved, now):
            distributed.print_rank0(f"warning: resume: {change}")
        return True

    def save(self) -> bool:
        """Save the step, unless the run is in a bad streak (its checkpoint would not be a good
        one, and pruning would delete a good one): True if saved."""
        if self.health.in_bad_streak:
            distributed.print_rank0(f"step {self.step}: not saved during a bad streak; the "
                                    f"newest good checkpoint stays {self._last_good_name()}")
            return False
        start = time.perf_counter()
        path = self.checkpoints.save(self.step, self.state_dict())
        if path is not None:
            self.last_good = path
            distributed.print_rank0(f"saved {path}")
            self.logger.scalars(self.step, {"timing_s/checkpoint": time.perf_counter() - start})
        return path is not None

    def _last_good_name(self) -> str:
        return str(self.last_good) if self.last_good else "none (nothing saved by this run)"

    # -- the loop ---------------------------------------------------------------------------
    def _log(self, metrics: dict[str, float], histograms: dict[str, torch.Tensor]) -> None:
        """Every ``logging.log_interval`` steps and the run's first (a resumed run's too), with
        the models' memory there only: it is constant after the first update."""
        first = not self._memory_logged
        if self.step % self.cfg.logging.log_interval == 0 or self.step == 1 or first:
            if first:  # the models the job holds: trained units and frozen ones
                metrics.update(model_state_metrics(self.units, self.job.frozen_models))
                self._memory_logged = True
            self.logger.log(self.step, metrics, self.job.summary_tags + ("perf/step_time_s",))
            self.logger.histograms(self.step, histograms)

    def _log_now(self, metrics: dict[str, float]) -> None:
        if metrics:
            self.logger.log(self.step, metrics, self.job.summary_tags)

    def run(self) -> None:
        previous = self.signals.install() if self._own_signals else {}
        try:
            resumed = self.resume()
            config = self.checkpoints.config_yaml()
            self.logger.open(self.step if resumed else None,  # markdown: indented is verbatim
                             {"config": "\n".join("    " + line for line in config.splitlines())},
                             hparams(to_dict(self.cfg)), self.job.summary_tags,
                             self.job.dashboard)
            distributed.print_rank0(
                f"TensorBoard: tensorboard --logdir {self.logger.directory.parent}"
                + (f", then open {self.job.dashboard.link()}" if self.job.dashboard else ""))
            self._log_now(self.job.start(resumed))
            self._steps()
        except UnhealthyRun as e:
            raise type(e)(f"{e}; the newest good checkpoint is {self._last_good_name()}") \
                from None
        finally:
            self.logger.close()
            StopSignals.restore(previous)

    def _step_metrics(self, result: StepResult, seconds: float) -> dict[str, float]:
        metrics = {**result.metrics, "perf/step_time_s": seconds, **memory_metrics()}
        if "perf/tokens" in metrics:  # verl's perf/throughput: tokens per second per GPU
            metrics["perf/throughput"] = (metrics["perf/tokens"] / seconds
                                          / torch.distributed.get_world_size())
        # counters only once they count something: a card of zeros says nothing
        for name in ("skipped_steps", "skipped_updates"):
            if getattr(self.health, name):
                metrics[f"train/{name}"] = float(getattr(self.health, name))
        if self.peak_tflops and "perf/train_tokens_per_s" in metrics:
            metrics["perf/mfu"] = model_flops_utilization(
                metrics["perf/train_tokens_per_s"], self.flops_per_token,
                torch.distributed.get_world_size(), self.peak_tflops)
        return metrics

    def _stop_for_signal(self, signum: int, saved: bool) -> None:
        """Save once (unless this step was just saved), requeue the Slurm job on SIGUSR1."""
        name = signal.Signals(signum).name
        if saved or self.save():
            distributed.print_rank0(f"{name} received: saved step {self.step}, exiting; a "
                                    "restart resumes here")
        else:
            distributed.print_rank0(f"{name} received at step {self.step}: exiting; a restart "
                                    f"resumes from {self._last_good_name()}")
        self.signals.requeue_if_asked(signum)

    def _steps(self) -> None:
        cfg, interval, exit_every = self.cfg, self.cfg.checkpoint.save_interval, \
            self.cfg.exit_interval
        if self.step < cfg.train_steps and (signum := self.signals.requested()):
            return self._stop_for_signal(signum, saved=True)  # during start-up: nothing new
        norm = parameters_norm(self.units) if cfg.divergence_factor else 0.0
        while self.step < cfg.train_steps:
            start = time.perf_counter()
            result = self.job.step(self.step)
            self.step += 1
            before, norm = norm, parameters_norm(self.units) if cfg.divergence_factor else 0.0
            warning = self.health.account(self.step, result.updates, result.metrics,
                                          norm / before if before else 1.0)
            if warning:
                distributed.print_rank0(warning)
            self._log(self._step_metrics(result, time.perf_counter() - start), result.histograms)
            self.logger.text(self.step, result.text)
            if result.stop:
                self.save()
                raise StoppedRun(f"stopped at step {self.step}, saved: {result.stop}")
            if self.step >= cfg.train_steps:
                break
            exiting = bool(exit_every and self.step % exit_every == 0)
            saved = (exiting or bool(interval and self.step % interval == 0)) and self.save()
            if signum := self.signals.requested():
                return self._stop_for_signal(signum, saved)
            if exiting:
                distributed.print_rank0(f"exit_interval={exit_every}: stopping at step "
                                        f"{self.step}; a restart resumes from "
                                        f"{self._last_good_name()}")
                return
        self.save()
        self._log_now(self.job.finish())
