"""The one device this rank computes on, and the process-group backend that goes with it.

Every tensor the project makes for a model input or a collective is created on ``device()``;
host-side batches move there in one place, ``to_device``. On a CPU run "cuda" never appears, so
a tensor left on the host would go unnoticed here and fail on the first GPU step: the device
audit test (tests/test_device.py) walks the source for tensor factories that name no device.
"""

from __future__ import annotations

import torch


def device() -> torch.device:
    """This rank's CUDA device (torchrun's LOCAL_RANK, set by ``init_distributed``), else the
    CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_device(batch: dict) -> dict:
    """A batch of host tensors (from ``collate`` or a rollout) on ``device()``."""
    target = device()
    return {k: v.to(target, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def process_group_backend(cuda: bool) -> str:
    """NCCL for device tensors on GPUs, with gloo beside it for host-side metadata (pickled
    objects, CPU counters); gloo alone on a CPU-only machine."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"
