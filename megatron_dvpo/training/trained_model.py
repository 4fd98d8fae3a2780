"""A model being trained: its chunks, megatron DDP, optimizer and LR schedule, and one update.

Every trained model in the project is one of these: the GVM and the reward model, the SFT and
RL policies, the PPO critic. ``update`` is the only place an optimizer steps, so the NaN/Inf
guard, the gradient norm and the LR schedule behave the same for all of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch
from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                       finalize_model_grads)
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from megatron_dvpo import distributed
from megatron_dvpo.checkpointing import load_model, read_model
from megatron_dvpo.config import OptimizerConfig, ParallelConfig, PrecisionConfig, RunConfig
from megatron_dvpo.integrity import require_intact
from megatron_dvpo.models import build_chunks
from megatron_dvpo.models.forward import Head, run_microbatches
from megatron_dvpo.models.gpt import DTYPES
from megatron_dvpo.models.moe import RouterStats
from megatron_dvpo.training.loss import Loss, global_counts, normalised

NON_FINITE = "a NaN/Inf loss or gradient"
# fp16's dynamic loss scaling: an overflowing scaled gradient skips the update and lowers the
# scale (megatron's optimizer decides); expected while the scale settles, so not a bad step
LOSS_SCALE_OVERFLOW = "an fp16 loss-scale overflow (the scale was lowered)"
RATIO_THRESHOLD = "the ratio threshold"  # the caller's accept() refused the update


def wrap_ddp(chunks: list[torch.nn.Module], parallel: ParallelConfig
             ) -> list[DistributedDataParallel]:
    """Megatron DDP around each chunk; gradients land in ``param.main_grad`` (fp32).

    The schedule then calls ``finalize_model_grads`` after the last microbatch: the DP reduction,
    plus the all-reduce of tied embedding gradients between the first and last pipeline stages.
    """
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        overlap_param_gather=parallel.overlap_param_gather,
        bucket_size=parallel.ddp_bucket_size,
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
    if parallel.overlap_grad_reduce:  # the schedules start each chunk's reduction in time
        sync = [w.start_grad_sync for w in wrapped]
        config.grad_sync_func = sync if len(sync) > 1 else sync[0]
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


@dataclass(frozen=True)
class UpdateResult:
    """One update: the microbatch outputs (last pipeline stage; empty elsewhere), whether the
    optimizer stepped, why not if it did not, the gradient norm of an applied step, and the
    loss's statistics and counts summed over the global batch (on every rank)."""

    outputs: list[dict]
    applied: bool
    skipped_for: Optional[str] = None
    grad_norm: Optional[float] = None
    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)
    router: dict[str, float] = field(default_factory=dict)  # a mixture of experts' (models/moe)

    @property
    def non_finite(self) -> bool:
        return self.skipped_for == NON_FINITE

    def router_metrics(self, prefix: str) -> dict[str, float]:
        """The router metrics under the trained model's tag prefix (``sft``, ``gvm``, ...)."""
        return {f"{prefix}/{tag}": value for tag, value in self.router.items()}


class TrainedModel:
    """Chunks + DDP + optimizer + LR schedule of one model, updated one minibatch at a time."""

    def __init__(self, chunks: list[torch.nn.Module], optim: OptimizerConfig,
                 parallel: ParallelConfig, precision: PrecisionConfig, total_updates: int,
                 override_scheduler: bool = False):
        self.chunks = chunks
        self.ddp = wrap_ddp(chunks, parallel)
        self.optimizer = build_optimizer(self.ddp, optim, parallel, precision)
        self.loss_scaled = precision.params_dtype == "fp16"
        # the schedules multiply each loss by the optimizer's loss scale before backward, as
        # Megatron-LM's training loop sets up: fp16's dynamic scale (without it the optimizer
        # unscaled unscaled gradients by 2^32 and fp16 never trained), 1 otherwise
        chunks[0].config.grad_scale_func = self.optimizer.scale_loss
        self.scheduler = build_scheduler(self.optimizer, optim, total_updates, override_scheduler)
        self.routers = RouterStats.of(chunks)  # a mixture of experts' load and router losses
        # overlap_param_gather: megatron DDP's forward pre-hooks finish each bucket's gather of
        # stepped weights in the next forward pass; on only during updates (see sync_params)
        self._gather_hooks_on = self.ddp[0].use_forward_hook
        self.sync_params()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def load_weights(self, directory: str | Path, skip: tuple[str, ...] = ()) -> None:
        """Initial weights from a checkpoint's ``model/``: the one way into a trained model.

        The optimizer made its fp32 main copy of bf16/fp16/FP8 parameters when it was built;
        it is refreshed here, or the first step would write a copy of the weights as they were
        before loading over the loaded ones. The distributed optimizer takes it from the
        checkpoint read again in fp32 (megatron's state-dict path), so that the main copy keeps
        the checkpoint's precision rather than the parameters' (an FP8 weight's, say); the
        other optimizers copy it from the loaded parameters. ``skip``: name prefixes that keep
        their current values (a GVM's fresh head on a policy's trunk).
        """
        require_intact(directory, ("model",))
        model_dir = Path(directory) / "model"
        load_model(self.chunks, model_dir, skip)
        self.optimizer.reload_model_params(self._main_params_source(model_dir))

    def _main_params_source(self, model_dir: Path) -> Optional[dict]:
        """The checkpoint's weights in fp32 where the optimizer can take its main copy from
        them (the distributed optimizer over lower-precision parameters), else None."""
        optimizers = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        lower = self.chunks[0].config.params_dtype != torch.float32
        if not (lower and all(isinstance(o, DistributedOptimizer) for o in optimizers)):
            return None
        read = read_model(self.chunks, model_dir, torch.float32)
        for part, chunk in zip(read.values(), self.chunks):
            for name, param in chunk.named_parameters():  # skipped ones: their own values
                part.setdefault(name, param.detach().float())
        return read

    def update(self, microbatches: list[dict], head: Head, loss: Loss,
               accept: Optional[Callable[[dict[str, float]], bool]] = None) -> UpdateResult:
        """Gradients of the global loss (``training/loss.py``: sums over global counts), then
        one optimizer step, unless a loss or gradient is NaN/Inf on any rank (no weight changes
        then) or ``accept``, called with the global sums of the loss's statistics on every
        rank, says no (the ratio-threshold rule)."""
        counts = global_counts(loss, microbatches)
        if self.ddp[0].use_forward_hook and not self._gather_hooks_on:
            for chunk in self.ddp:
                chunk.enable_forward_pre_hook()
            self._gather_hooks_on = True
        for chunk in self.ddp:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = run_microbatches(self.ddp, microbatches, head, normalised(loss, counts))
        local = ({k: sum(float(o[k]) for o in outputs) for k in loss.stats}
                 if outputs else None)
        result = UpdateResult(outputs, False, sums=distributed.sum_over_replicas(
            list(loss.stats), local), counts=counts,
            router=self.routers.take(len(microbatches)) if self.routers else {})
        # under fp16 loss scaling the optimizer checks the gradients itself (and must, to lower
        # its scale); a non-finite loss is never the scale's doing
        if not self._all_finite(outputs, gradients=not self.loss_scaled):
            return replace(result, skipped_for=NON_FINITE)
        if accept is not None and not accept(result.sums):
            return replace(result, skipped_for=RATIO_THRESHOLD)
        success, grad_norm, _ = self.optimizer.step()
        if not success:  # megatron's fp16 loss-scale check found Inf/NaN gradients
            return replace(result, skipped_for=LOSS_SCALE_OVERFLOW)
        self.scheduler.step(increment=1)
        return replace(result, applied=True, grad_norm=float(grad_norm or 0.0))

    def sync_params(self) -> None:
        """With overlap_param_gather, an optimizer step leaves this rank's parameters stale
        outside its own shard until the next forward pass gathers them. Code that reads the
        weights outside an update (a rollout, a checkpoint) calls this first: it finishes the
        gathers (a collective over the data-parallel group) and turns the pre-hooks off, so the
        rollout's many small forward passes do not pay for them. A no-op otherwise."""
        if self._gather_hooks_on:
            for chunk in self.ddp:
                chunk.disable_forward_pre_hook(param_sync=True)
            self._gather_hooks_on = False

    def _all_finite(self, outputs: list[dict], gradients: bool = True) -> bool:
        """Every rank's losses, and ``gradients``, are finite."""
        bad = any(not math.isfinite(float(o["loss"])) for o in outputs)
        for chunk in self.ddp if gradients else []:
            for param in chunk.module.parameters():
                grad = getattr(param, "main_grad", None)
                if bad or (grad is not None and not torch.isfinite(grad).all()):
                    bad = True
                    break
        return distributed.all_reduce_max(float(bad)) == 0.0


def trained_policy(cfg: RunConfig) -> TrainedModel:
    """The policy of a job that updates it once a step (SFT, DPO), its schedule over
    ``cfg.train_steps``."""
    return TrainedModel(build_chunks(cfg), cfg.optimizer, cfg.parallel, cfg.precision,
                        cfg.train_steps, cfg.checkpoint.override_scheduler)
