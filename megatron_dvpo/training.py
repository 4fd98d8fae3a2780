"""Pieces every trainer shares: megatron DDP wrapping and the megatron-core optimizer."""

from __future__ import annotations

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer

from megatron_dvpo.config import OptimizerConfig, ParallelConfig, PrecisionConfig
from megatron_dvpo.models.gpt import DTYPES


def wrap_ddp(chunks: list[torch.nn.Module], parallel: ParallelConfig) -> list[DistributedDataParallel]:
    """Megatron DDP around each chunk; gradients land in ``param.main_grad`` (fp32).

    The schedule then calls ``finalize_model_grads`` after the last microbatch: the DP reduction,
    plus the all-reduce of tied embedding gradients between the first and last pipeline stages.
    """
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
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
    )
    return get_megatron_optimizer(config, chunks)
