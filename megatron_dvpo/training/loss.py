"""A loss as every trainer hands it to ``TrainedModel.update``: sums and counts.

A microbatch's loss function returns summed terms (differentiable) and summed statistics
(detached); each term's count (the tokens, responses or pairs it is a mean over) is read off
the microbatch itself, before any forward pass. The update adds the counts over microbatches
and data-parallel replicas and divides each term once (``normalised``), so no trainer or
algorithm knows how the batch was split, and a DP=2, PP=2 or token-budget step has the gradient
of the same global mean as one rank's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from megatron.core import parallel_state

from megatron_dvpo.device import device

Sums = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Loss:
    """``terms(outputs, microbatch) -> (terms, stats)``, both dicts of sums; ``counts(
    microbatch)``: each term's count in it (every term needs one); ``stats``: the statistics'
    names, which every rank needs, as only the last pipeline stage computes them."""

    terms: Callable[[dict, dict], tuple[Sums, Sums]]
    counts: Callable[[dict], dict[str, torch.Tensor | float]]
    stats: tuple[str, ...] = ()


def global_counts(loss: Loss, microbatches: list[dict]) -> dict[str, float]:
    """Each term's count over every microbatch of every data-parallel replica."""
    local: dict[str, torch.Tensor] = {}
    for microbatch in microbatches:
        for name, count in loss.counts(microbatch).items():
            local[name] = local.get(name, 0.0) + torch.as_tensor(count, dtype=torch.float64,
                                                                  device=device())
    names = sorted(local)
    total = torch.stack([local[n] for n in names]) if names else torch.zeros(0, device=device())
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return dict(zip(names, total.tolist()))


def normalised(loss: Loss, counts: dict[str, float]) -> Callable[[dict, dict], tuple]:
    """The microbatch's share of the global loss: each summed term over its global count
    (an empty count leaves its zero sum), times the data-parallel size, which megatron's DDP
    divides the summed gradients by."""
    replicas = parallel_state.get_data_parallel_world_size()

    def share(outputs: dict, microbatch: dict):
        terms, stats = loss.terms(outputs, microbatch)
        missing = set(terms) - set(counts)
        if missing:
            raise ValueError(f"loss terms {sorted(missing)} have no count")
        total = sum(value / max(counts[name], 1.0) for name, value in terms.items())
        return total * replicas, stats

    return share
