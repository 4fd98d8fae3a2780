"""Measured bytes of every model a job holds: parameters, gradient buffers, optimizer state.

Counted from the tensors themselves (this rank's shards), so that method comparisons
(``tools/bench_methods.py``) report what each method allocates rather than a formula. Logged
each step as ``memory/<model>_gib`` and ``memory/model_state_gib`` (their sum).
"""

from __future__ import annotations

from typing import Iterable

import torch

GIB = 2 ** 30


def _bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def parameter_bytes(chunks: list[torch.nn.Module]) -> int:
    return _bytes(p for chunk in chunks for p in chunk.parameters())


def _optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def trained_bytes(model) -> dict[str, int]:
    """A ``TrainedModel``'s parameters, megatron DDP's gradient buffers, and the optimizer's
    state (Adam moments) and fp32 main copies of lower-precision parameters."""
    params = parameter_bytes(model.chunks)
    grads = _bytes(buffer.grad_data for chunk in model.ddp
                   for buffer in getattr(chunk, "buffers", []) + getattr(
                       chunk, "expert_parallel_buffers", []))
    model_ptrs = {p.untyped_storage().data_ptr() for c in model.chunks for p in c.parameters()}
    state, main = [], []
    for opt in _optimizers(model.optimizer):
        inner = getattr(opt, "optimizer", opt)
        state += [t for s in inner.state.values() for t in s.values()
                  if isinstance(t, torch.Tensor)]
        main += [p for group in inner.param_groups for p in group["params"]
                 if p.untyped_storage().data_ptr() not in model_ptrs]
    return {"params": params, "grads": grads, "optimizer": _bytes(state) + _bytes(main)}


def model_state_metrics(trained: dict, frozen: dict[str, list[torch.nn.Module]]
                        ) -> dict[str, float]:
    """``memory/<name>_gib`` of each trained unit and frozen model, and their total."""
    sizes = {name: sum(trained_bytes(model).values()) for name, model in trained.items()}
    sizes.update({name: parameter_bytes(chunks) for name, chunks in frozen.items()})
    metrics = {f"memory/{name}_gib": size / GIB for name, size in sizes.items()}
    metrics["memory/model_state_gib"] = sum(sizes.values()) / GIB
    return metrics
