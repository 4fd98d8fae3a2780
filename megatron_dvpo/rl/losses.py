"""Policy, critic, reward-model and DPO losses (docs/algorithm.md §2-3).

Pure torch functions on one microbatch; nothing here communicates. Per-token tensors are
response-aligned ``[B, T]`` next to a bool ``mask``. Token losses return the SUM over valid
tokens divided by ``normalizer`` when given (the trainer passes the global minibatch token
count, so microbatches and data-parallel ranks add up to the documented mean) and the mean over
this batch's valid tokens otherwise. Stats are detached sums, ready to stack and all-reduce.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megatron_dvpo.rl.advantages import _check_shapes

__all__ = ["ppo_policy_loss", "entropy_bonus", "value_loss_clipped", "bradley_terry_loss",
           "dpo_loss", "should_skip_minibatch"]


def _check_positive(**params: float | None) -> None:
    for name, value in params.items():
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")


def _reduce(per_token: torch.Tensor, mask: torch.Tensor,
            normalizer: float | None) -> torch.Tensor:
    """Masked sum over tokens divided by ``normalizer``, or by the valid-token count (an empty
    mask gives 0 rather than NaN, without a host sync)."""
    total = torch.where(mask, per_token, 0.0).sum()
    if normalizer is not None:
        return total / normalizer
    return total / mask.sum().clamp(min=1)


def ppo_policy_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip_eps: float = 0.2, normalizer: float | None = None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate ``-min(rho * A, clip(rho, 1 - eps, 1 + eps) * A)`` per token.

    ``rho = exp(logp - logp_old)``; the gradient reaches ``logp`` only. Where the clipped branch
    is active the token contributes a constant, so the update cannot push ``rho`` further out.
    Padding is zeroed before the ``exp``, so junk there can neither overflow nor leak a NaN
    gradient.

    ``stats``: ``tokens``, ``clipfrac_sum`` (tokens whose unclipped objective exceeds the
    clipped one, i.e. the clip is active), ``ratio_sum`` (of ``rho``) and ``approx_kl_sum`` of
    ``(rho - 1) - log(rho)`` per token: Schulman's low-variance, non-negative, unbiased
    estimator of ``KL(pi_old || pi_theta)`` on tokens sampled from ``pi_old``.
    """
    _check_positive(clip_eps=clip_eps, normalizer=normalizer)
    _check_shapes(mask, logp=logp, logp_old=logp_old, advantages=advantages)
    log_ratio = torch.where(mask, logp - logp_old.detach(), 0.0)
    ratio = log_ratio.exp()
    advantages = torch.where(mask, advantages.detach(), 0.0)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages
    loss = _reduce(-torch.minimum(unclipped, clipped), mask, normalizer)
    with torch.no_grad():
        stats = {
            "tokens": mask.sum(),
            "clipfrac_sum": (mask & (unclipped > clipped)).sum(),
            "approx_kl_sum": torch.where(mask, (ratio - 1.0) - log_ratio, 0.0).sum(),
            "ratio_sum": torch.where(mask, ratio, 0.0).sum(),
        }
        stats = {k: v.detach().to(loss.dtype) for k, v in stats.items()}
    return loss, stats


def entropy_bonus(entropy: torch.Tensor, mask: torch.Tensor, coef: float,
                  normalizer: float | None = None) -> torch.Tensor:
    """``-coef * sum(entropy) / normalizer`` (or the token mean): added to the loss, so
    minimising it raises the policy's entropy. ``entropy`` comes from the vocab-parallel
    computation in the trainer."""
    if not coef >= 0:
        raise ValueError(f"coef must be >= 0, got {coef}")
    _check_positive(normalizer=normalizer)
    _check_shapes(mask, entropy=entropy)
    return -coef * _reduce(entropy, mask, normalizer)


def value_loss_clipped(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, clip_eps: float = 0.2,
                       normalizer: float | None = None
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The PPO critic's ``0.5 * max((v - R)^2, (clip(v, v_old - eps, v_old + eps) - R)^2)``.

    Taking the larger error means a prediction that moved more than ``eps`` from the rollout's
    value gets no credit for overshooting toward the return, which keeps the critic close to
    the values the advantages were computed with. ``stats``: ``tokens`` and ``clipfrac_sum``
    (tokens where the clipped error is the larger one).
    """
    _check_positive(clip_eps=clip_eps, normalizer=normalizer)
    _check_shapes(mask, values=values, old_values=old_values, returns=returns)
    old_values, returns = old_values.detach(), returns.detach()
    clipped_values = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    unclipped_err = (values - returns).square()
    clipped_err = (clipped_values - returns).square()
    loss = _reduce(0.5 * torch.maximum(unclipped_err, clipped_err), mask, normalizer)
    with torch.no_grad():
        stats = {
            "tokens": mask.sum(),
            "clipfrac_sum": (mask & (clipped_err > unclipped_err)).sum(),
        }
        stats = {k: v.to(loss.dtype) for k, v in stats.items()}
    return loss, stats


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean ``-log sigmoid(r_chosen - r_rejected)`` over ``N`` pairs, for the reward model.

    ``F.logsigmoid`` stays finite for large negative margins, where ``log(sigmoid(.))``
    underflows to ``-inf``. ``stats``: ``accuracy`` (share of pairs with chosen > rejected, a tie
    counting half) and ``margin_mean``, both detached.
    """
    if r_chosen.dim() != 1 or r_chosen.shape != r_rejected.shape or r_chosen.numel() == 0:
        raise ValueError(f"need two non-empty [N] tensors of rewards, got "
                         f"{tuple(r_chosen.shape)} and {tuple(r_rejected.shape)}")
    margin = r_chosen - r_rejected
    loss = -F.logsigmoid(margin).mean()
    with torch.no_grad():
        stats = {"accuracy": _ranked_right(margin).mean(), "margin_mean": margin.detach().mean()}
    return loss, stats


def _ranked_right(margin: torch.Tensor) -> torch.Tensor:
    """Per pair: 1 where the chosen response scores higher, 1/2 for a tie, else 0."""
    return (margin > 0).to(margin.dtype) + 0.5 * (margin == 0).to(margin.dtype)


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed DPO loss ``-log sigmoid(beta * ((c - c_ref) - (r - r_ref)))`` over ``N`` pairs of
    response log-probs (Rafailov et al., 2023); zeros for the references give the
    reference-free variant. ``stats`` (detached sums): ``correct`` (pairs whose implicit reward
    ``beta * (logp - logp_ref)`` ranks the chosen response higher, a tie counting half),
    ``margin_sum``, ``chosen_reward_sum``, ``rejected_reward_sum``."""
    _check_positive(beta=beta)
    chosen_reward = beta * (chosen - ref_chosen.detach())
    rejected_reward = beta * (rejected - ref_rejected.detach())
    margin = chosen_reward - rejected_reward
    loss = -F.logsigmoid(margin).sum()
    with torch.no_grad():
        stats = {"correct": _ranked_right(margin).sum(),
                 "margin_sum": margin.sum(), "chosen_reward_sum": chosen_reward.sum(),
                 "rejected_reward_sum": rejected_reward.sum()}
    return loss, stats


def should_skip_minibatch(ratio_mean: float, threshold: float = 10.0) -> bool:
    """Skip the update when the mean ``rho`` exceeds ``threshold``: the policy has drifted
    too far from the rollout for the samples to be trusted. A NaN mean also skips."""
    _check_positive(threshold=threshold)
    ratio_mean = float(ratio_mean)  # also takes a 0-d tensor of all-reduced sums
    return math.isnan(ratio_mean) or ratio_mean > threshold
