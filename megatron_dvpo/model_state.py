"""Measured bytes of every model a job holds: parameters, gradient buffers, optimizer state.

Counted from the tensors themselves (this rank's shards), so that method comparisons
(``tools/bench_methods.py``) report what each method allocates rather than a formula. Logged
each step as ``memory/<model>_gib`` and ``memory/model_state_gib`` (their sum).
"""

from __future__ import annotations

from typing import Iterable

import torch

GIB = 2 ** 30


def _storage_ptr(t: torch.Tensor) -> int:
    """The address of ``t``'s storage; 0 for a tensor that owns none."""
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return 0


def _plain_parts(t: torch.Tensor) -> list[torch.Tensor]:
    """The tensors with storage that hold ``t``'s bytes: ``t`` itself, or the inner tensors of
    a wrapper subclass that owns no storage (Transformer Engine's FP8 parameters: one byte per
    element plus scales), by torch's ``__tensor_flatten__`` protocol or else their tensor
    attributes. Such a wrapper's own ``element_size`` is its nominal dtype's, not its data's."""
    if _storage_ptr(t) or t.numel() == 0:
        return [t]
    flatten = getattr(t, "__tensor_flatten__", None)
    names = (flatten()[0] if flatten is not None
             else [n for n, v in vars(t).items() if isinstance(v, torch.Tensor)])
    return [p for name in names for p in _plain_parts(getattr(t, name))]


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes held by ``tensors``, each storage region counted once."""
    seen, total = set(), 0
    for t in (p for tensor in tensors for p in _plain_parts(tensor)):
        key = (_storage_ptr(t), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def parameter_bytes(chunks: list[torch.nn.Module]) -> int:
    return tensor_bytes(p for chunk in chunks for p in chunk.parameters())


def _optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def trained_bytes(model) -> dict[str, int]:
    """A ``TrainedModel``'s parameters, megatron DDP's gradient buffers, and the optimizer's
    state (Adam moments) and fp32 main copies of lower-precision parameters."""
    params = parameter_bytes(model.chunks)
    grads = tensor_bytes(buffer.grad_data for chunk in model.ddp
                         for buffer in getattr(chunk, "buffers", []) + getattr(
                             chunk, "expert_parallel_buffers", []))
    model_ptrs = {_storage_ptr(part) for c in model.chunks for p in c.parameters()
                  for part in _plain_parts(p)}
    state, main = [], []
    for opt in _optimizers(model.optimizer):
        inner = getattr(opt, "optimizer", opt)
        state += [t for s in inner.state.values() for t in s.values()
                  if isinstance(t, torch.Tensor)]
        main += [p for group in inner.param_groups for p in group["params"]
                 if _storage_ptr(p) not in model_ptrs]
    return {"params": params, "grads": grads,
            "optimizer": tensor_bytes(state) + tensor_bytes(main)}


def model_state_metrics(trained: dict, frozen: dict[str, list[torch.nn.Module]]
                        ) -> dict[str, float]:
    """``memory/<name>_gib`` of each trained unit and frozen model, and their total."""
    sizes = {name: sum(trained_bytes(model).values()) for name, model in trained.items()}
    sizes.update({name: parameter_bytes(chunks) for name, chunks in frozen.items()})
    metrics = {f"memory/{name}_gib": size / GIB for name, size in sizes.items()}
    metrics["memory/model_state_gib"] = sum(sizes.values()) / GIB
    return metrics
