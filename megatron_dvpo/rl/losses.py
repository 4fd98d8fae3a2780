"""Value, reward-model and preference losses by name (docs/algorithm.md §1-3); the policy
losses are in ``rl/policy_loss.py``.

Pure torch functions on one microbatch; nothing here communicates. Each returns a *sum* over
its tokens or pairs and detached stats sums; the update divides by the global count once
(``training/loss.py``).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from megatron_dvpo.rl.advantages import _check_shapes
from megatron_dvpo.rl.policy_loss import check_positive

__all__ = ["VALUE_LOSSES", "value_loss_clipped", "value_loss_mse", "bradley_terry_loss",
           "DPO_LOSSES", "dpo_loss"]


def value_loss_clipped(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, clip_eps: float = 0.2
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The PPO critic's ``0.5 * max((v - R)^2, (clip(v, v_old - eps, v_old + eps) - R)^2)``,
    summed over tokens.

    Taking the larger error means a prediction that moved more than ``eps`` from the rollout's
    value gets no credit for overshooting toward the return, which keeps the critic close to
    the values the advantages were computed with. ``stats``: ``tokens`` and ``clipfrac_sum``
    (tokens where the clipped error is the larger one).
    """
    check_positive(clip_eps=clip_eps)
    _check_shapes(mask, values=values, old_values=old_values, returns=returns)
    old_values, returns = old_values.detach(), returns.detach()
    clipped_values = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    unclipped_err = (values - returns).square()
    clipped_err = (clipped_values - returns).square()
    loss = torch.where(mask, 0.5 * torch.maximum(unclipped_err, clipped_err), 0.0).sum()
    with torch.no_grad():
        stats = {"tokens": mask.sum(), "clipfrac_sum": (mask & (clipped_err > unclipped_err)).sum()}
        stats = {k: v.to(loss.dtype) for k, v in stats.items()}
    return loss, stats


def value_loss_mse(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   mask: torch.Tensor, clip_eps: float = 0.2
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``0.5 * (v - R)^2`` summed over tokens, unclipped (OpenRLHF's and TRL's default is the
    clipped loss; verl's ``clip_ratio`` off); ``old_values`` and ``clip_eps`` are unused."""
    _check_shapes(mask, values=values, old_values=old_values, returns=returns)
    loss = torch.where(mask, 0.5 * (values - returns.detach()).square(), 0.0).sum()
    return loss, {"tokens": mask.sum().to(loss.dtype), "clipfrac_sum": loss.new_zeros(())}


# PPO's critic loss (ppo.value_loss).
VALUE_LOSSES: dict[str, Callable] = {"clipped": value_loss_clipped, "mse": value_loss_mse}


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed ``-log sigmoid(r_chosen - r_rejected)`` over ``N`` pairs, for the reward model.

    ``F.logsigmoid`` stays finite for large negative margins, where ``log(sigmoid(.))``
    underflows to ``-inf``. ``stats`` (detached sums): ``correct`` (pairs with chosen >
    rejected, a tie counting half) and ``margin_sum``.
    """
    if r_chosen.dim() != 1 or r_chosen.shape != r_rejected.shape or r_chosen.numel() == 0:
        raise ValueError(f"need two non-empty [N] tensors of rewards, got "
                         f"{tuple(r_chosen.shape)} and {tuple(r_rejected.shape)}")
    margin = r_chosen - r_rejected
    loss = -F.logsigmoid(margin).sum()
    with torch.no_grad():
        stats = {"correct": _ranked_right(margin).sum(), "margin_sum": margin.detach().sum()}
    return loss, stats


def _ranked_right(margin: torch.Tensor) -> torch.Tensor:
    """Per pair: 1 where the chosen response scores higher, 1/2 for a tie, else 0."""
    return (margin > 0).to(margin.dtype) + 0.5 * (margin == 0).to(margin.dtype)


def _sigmoid(margin: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    return (-(1.0 - label_smoothing) * F.logsigmoid(margin)
            - label_smoothing * F.logsigmoid(-margin))


def _ipo(margin: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    return (margin / beta - 1.0 / (2.0 * beta)).square()


# DPO's losses on the margin of implicit rewards (dpo.loss), per pair: sigmoid, Rafailov et al.
# 2023 (with dpo.label_smoothing, conservative DPO); ipo, Azar et al. 2023.
DPO_LOSSES: dict[str, Callable[[torch.Tensor, float, float], torch.Tensor]] = {
    "sigmoid": _sigmoid, "ipo": _ipo}


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss: str = "sigmoid",
             label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed DPO loss over ``N`` pairs of response log-probs; zeros for the references give
    the reference-free variant. With ``h = (c - c_ref) - (r - r_ref)``:

    - ``sigmoid``: ``-(1 - s) log sigmoid(beta h) - s log sigmoid(-beta h)``, ``s`` the label
      smoothing (conservative DPO: the labels are wrong with probability ``s``; 0 is DPO);
    - ``ipo``: ``(h - 1 / (2 beta))^2``, which pulls the margin to a finite target instead of
      pushing it without end.

    ``stats`` (detached sums): ``correct`` (pairs whose implicit reward ``beta * (logp -
    logp_ref)`` ranks the chosen response higher, a tie counting half), ``margin_sum``,
    ``chosen_reward_sum``, ``rejected_reward_sum``."""
    check_positive(beta=beta)
    if loss not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss {loss!r}; one of {tuple(DPO_LOSSES)}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_reward = beta * (chosen - ref_chosen.detach())
    rejected_reward = beta * (rejected - ref_rejected.detach())
    margin = chosen_reward - rejected_reward
    value = DPO_LOSSES[loss](margin, beta, label_smoothing).sum()
    with torch.no_grad():
        stats = {"correct": _ranked_right(margin).sum(),
                 "margin_sum": margin.sum(), "chosen_reward_sum": chosen_reward.sum(),
                 "rejected_reward_sum": rejected_reward.sum()}
    return value, stats
