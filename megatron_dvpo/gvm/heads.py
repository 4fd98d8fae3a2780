"""Reading a K-head GVM (docs/algorithm.md §1, "Value heads"; §2, "Pessimistic values").

A GVM with ``model.value_heads`` K > 1 outputs ``[B, S, K]``: K value heads on one trunk, drawn
apart at initialisation and trained on the same targets. Where the trunk's features are like
its training data's, the heads agree; elsewhere the parts of their weights that no training
example constrained still differ, and so do their values. Their spread is the GVM's
uncertainty (Coste et al. 2023 and Eisenstein et al. 2023 use whole reward models; heads on one
trunk cost one extra ``hidden x K`` matrix). A one-head GVM's ``[B, S]`` passes through.

Pure functions; nothing here runs a model or communicates.
"""

from __future__ import annotations

from typing import Optional

import torch


def heads_of(values: torch.Tensor) -> int:
    """K of a value model's ``[B, S]`` (1) or ``[B, S, K]`` outputs."""
    return values.shape[-1] if values.dim() == 3 else 1


def heads_as_rows(values: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
    """``[B, S, K]`` -> ``([K * B, S], batch with its per-row tensors repeated K times)``:
    head ``k``'s rows are ``k * B .. (k + 1) * B - 1``, so a loss written for one value per
    position trains every head on its own predictions (its own TD targets), and pairs of
    adjacent rows stay pairs."""
    if values.dim() == 2:
        return values, batch
    rows, heads = values.shape[0], values.shape[-1]
    stacked = values.permute(2, 0, 1).reshape(heads * rows, values.shape[1])
    repeated = {key: value.repeat(heads, *([1] * (value.dim() - 1)))
                if torch.is_tensor(value) and value.dim() and value.shape[0] == rows else value
                for key, value in batch.items()}
    return stacked, repeated


def read_heads(values: torch.Tensor, pessimism: float = 0.0
               ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(mean - pessimism * std, std)`` over the heads of ``[..., K]`` values; a one-head
    ``[B, S]`` gives ``(values, None)``. The std is the population one (K, not K - 1): with
    two heads it is half their gap."""
    if values.dim() == 2:
        return values, None
    spread = values.std(-1, correction=0)
    return values.mean(-1) - pessimism * spread, spread


def mean_value(values: torch.Tensor) -> torch.Tensor:
    """The ensemble's value: its heads' mean (a one-head GVM's own)."""
    return read_heads(values)[0]
