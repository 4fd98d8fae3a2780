"""Pairwise accuracy of a value model on held-out preference pairs (docs/algorithm.md §1).

Each response is reduced to one number, a statistic of its per-token Q-values ``q_0 .. q_{T-1}``
(response positions only); a pair counts as correct when the chosen response scores higher.
Several statistics are reported side by side, as in the paper's Table 4.
"""

from __future__ import annotations

import torch

__all__ = ["PERCENTILES", "response_statistics", "pairwise_accuracy", "format_accuracy_table"]

PERCENTILES = (1, 5, 10, 90, 95, 99)


def response_statistics(q: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-row statistics of the valid entries of ``q [B, T]``, each a float32 ``[B]`` tensor.

    Keys: ``last`` (value at the last valid position), ``mean``, and ``p1 .. p99`` (percentiles
    with linear interpolation between order statistics, as ``torch.quantile``).
    """
    if q.dim() != 2 or q.shape != mask.shape or mask.dtype != torch.bool:
        raise ValueError(f"need q [B, T] and a bool mask of the same shape, got q "
                         f"{tuple(q.shape)} and mask {mask.dtype} {tuple(mask.shape)}")
    if q.shape[0] == 0 or not bool(mask.any(1).all()):
        raise ValueError("every row needs at least one valid value")
    q = q.detach().float()
    positions = torch.arange(q.shape[1], device=q.device).expand_as(q)
    last_index = torch.where(mask, positions, -1).amax(1, keepdim=True)
    probs = torch.tensor([p / 100 for p in PERCENTILES], device=q.device)
    quantiles = torch.stack([torch.quantile(row[keep], probs) for row, keep in zip(q, mask)], 1)
    stats = {
        "last": q.gather(1, last_index).squeeze(1),
        "mean": torch.where(mask, q, 0.0).sum(1) / mask.sum(1),
    }
    stats.update({f"p{p}": quantiles[i] for i, p in enumerate(PERCENTILES)})
    return stats


def pairwise_accuracy(chosen_stats: dict[str, torch.Tensor],
                      rejected_stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per statistic, the share of pairs where the chosen response scores strictly higher.

    A tie counts as half a correct pair, so a constant value model scores exactly 0.5 instead
    of 0 or 1. Row ``i`` of both dicts must be the two responses of the same pair.
    """
    if chosen_stats.keys() != rejected_stats.keys():
        raise ValueError(f"statistics differ: {sorted(chosen_stats)} vs {sorted(rejected_stats)}")
    accuracy = {}
    for name, chosen in chosen_stats.items():
        rejected = rejected_stats[name]
        if chosen.dim() != 1 or chosen.shape != rejected.shape or chosen.numel() == 0:
            raise ValueError(f"statistic {name!r}: need two non-empty [N] tensors, got "
                             f"{tuple(chosen.shape)} and {tuple(rejected.shape)}")
        score = (chosen > rejected).double() + 0.5 * (chosen == rejected).double()
        accuracy[name] = float(score.mean())
    return accuracy


def format_accuracy_table(acc: dict[str, float], counts: int) -> str:
    """A fixed-width two-column table (statistic, accuracy in %) over ``counts`` pairs."""
    lines = [f"pairwise accuracy over {counts} pairs", f"{'statistic':<10} {'accuracy':>9}"]
    lines += [f"{name:<10} {100 * value:>8.2f}%" for name, value in acc.items()]
    return "\n".join(lines)
