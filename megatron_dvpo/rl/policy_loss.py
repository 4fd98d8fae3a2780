"""Policy losses by name (``rl.policy_loss``), their aggregation and the rollout/training
importance correction (docs/algorithm.md §2, "Policy-loss options").

Pure torch functions on one microbatch; nothing here communicates. Per-token tensors are
response-aligned ``[B, T]`` next to a bool ``mask``. Every loss returns its *sum* (over tokens,
or over per-response means, as ``rl.loss_agg_mode`` says) and, in its stats, the ``count`` that
sum is a mean over (``aggregation_count``): the update divides by the global count once
(``training/loss.py``). Stats are detached sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from megatron_dvpo.rl.advantages import _check_shapes

__all__ = ["AGGREGATIONS", "PolicyLossOptions", "POLICY_LOSSES", "ppo_policy_loss",
           "gspo_policy_loss", "aggregate", "aggregation_count", "entropy_bonus",
           "IS_CORRECTIONS", "importance_weights", "check_positive", "should_skip_minibatch"]

# How a token loss becomes one number (rl.loss_agg_mode), as verl names them: every response
# token weighs the same; every response weighs the same (its tokens' mean); every response's
# summed loss, averaged over responses; summed losses over responses x a constant horizon
# (Dr. GRPO's normaliser, rollout.max_new_tokens), which weighs no response by its length.
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                "seq-mean-token-sum-norm")


def check_positive(**params: float | None) -> None:
    for name, value in params.items():
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")


def aggregation_count(mask: torch.Tensor, mode: str = "token-mean", horizon: int = 1
                      ) -> torch.Tensor:
    """What ``aggregate``'s sum is a mean over, in this batch: its valid tokens, its responses,
    or its responses x ``horizon``."""
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}; one of {AGGREGATIONS}")
    if mode == "token-mean":
        return mask.sum()
    rows = torch.tensor(float(mask.shape[0]), device=mask.device)
    return rows * horizon if mode == "seq-mean-token-sum-norm" else rows


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean"
              ) -> torch.Tensor:
    """``per_token`` summed the way ``mode`` says: over tokens, or over each response's token
    mean (``seq-mean-token-mean``). Divided by ``aggregation_count`` it is the mode's mean."""
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}; one of {AGGREGATIONS}")
    masked = torch.where(mask, per_token, 0.0)
    if mode == "seq-mean-token-mean":
        return (masked.sum(1) / mask.sum(1).clamp(min=1)).sum()
    return masked.sum()


@dataclass(frozen=True)
class PolicyLossOptions:
    """The settings every policy loss reads (rl.* keys of the same names)."""

    clip_eps: float = 0.2
    dual_clip: Optional[float] = None
    log_ratio_clamp: Optional[float] = None
    agg: str = "token-mean"
    horizon: int = 1  # rollout.max_new_tokens, the constant of seq-mean-token-sum-norm

    def __post_init__(self):
        check_positive(clip_eps=self.clip_eps, log_ratio_clamp=self.log_ratio_clamp)
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ValueError(f"dual_clip must be > 1, got {self.dual_clip}")
        if self.agg not in AGGREGATIONS:
            raise ValueError(f"unknown loss aggregation {self.agg!r}; one of {AGGREGATIONS}")


def _clipped_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                       options: PolicyLossOptions, weights: Optional[torch.Tensor]
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``-min(rho A, clip(rho, 1 - eps, 1 + eps) A)`` per token from ``log rho`` (0 at padding),
    with the options' clamp, dual clip and aggregation; summed, with its stats."""
    if options.log_ratio_clamp is not None:
        log_ratio = log_ratio.clamp(-options.log_ratio_clamp, options.log_ratio_clamp)
    ratio = log_ratio.exp()
    advantages = torch.where(mask, advantages.detach(), 0.0)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - options.clip_eps, 1.0 + options.clip_eps) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    dual = torch.zeros_like(mask)
    if options.dual_clip is not None:
        dual = mask & (advantages < 0) & (per_token > -options.dual_clip * advantages)
        per_token = torch.where(dual, -options.dual_clip * advantages, per_token)
    if weights is not None:
        per_token = per_token * weights.detach()
    loss = aggregate(per_token, mask, options.agg)
    with torch.no_grad():
        stats = {
            "tokens": mask.sum(),
            "count": aggregation_count(mask, options.agg, options.horizon),
            "clipfrac_sum": (mask & (unclipped > clipped)).sum(),
            "dual_clipfrac_sum": dual.sum(),
            "approx_kl_sum": torch.where(mask, (ratio - 1.0) - log_ratio, 0.0).sum(),
            "ratio_sum": torch.where(mask, ratio, 0.0).sum(),
        }
        stats = {k: v.detach().to(loss.dtype) for k, v in stats.items()}
    return loss, stats


def ppo_policy_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, options: PolicyLossOptions = PolicyLossOptions(),
                    weights: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate on the per-token ratio ``rho = exp(logp - logp_old)``.

    The gradient reaches ``logp`` only; where the clipped branch is active the token adds a
    constant, so the update cannot push ``rho`` further out. Padding is zeroed before the
    ``exp``, so junk there can neither overflow nor leak a NaN gradient.
    ``options.log_ratio_clamp`` bounds ``log rho`` to ``[-c, c]`` first (at a log-ratio of 25
    and A = -1 the loss would otherwise be 7.2e10). ``options.dual_clip`` (Ye et al., 2020;
    verl's ``clip_ratio_c``) caps a negative advantage's loss at ``-c * A``. ``weights``
    (detached) multiply each token's loss: a rollout/training importance correction.

    ``stats``: ``tokens``, ``count``, ``clipfrac_sum`` (tokens whose clip is active),
    ``dual_clipfrac_sum``, ``ratio_sum`` and ``approx_kl_sum`` of ``(rho - 1) - log(rho)``:
    Schulman's non-negative, unbiased estimator of ``KL(pi_old || pi_theta)``.
    """
    _check_shapes(mask, logp=logp, logp_old=logp_old, advantages=advantages)
    log_ratio = torch.where(mask, logp - logp_old.detach(), 0.0)
    return _clipped_surrogate(log_ratio, advantages, mask, options, weights)


def gspo_policy_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
                     mask: torch.Tensor, options: PolicyLossOptions = PolicyLossOptions(),
                     weights: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO (Zheng et al., 2025): the clipped surrogate on each response's *sequence* ratio
    ``s = exp(mean_t log rho_t)``, the same for all its tokens, whose gradient reaches each
    token as ``s * d logp_t`` (``log s_t = sg(log s) + logp_t - sg(logp_t)``). One clip
    decision per response, so a few outlying tokens cannot clip or unclip a whole response;
    the paper clips at ``eps`` of a few 1e-4 and aggregates ``seq-mean-token-mean``."""
    _check_shapes(mask, logp=logp, logp_old=logp_old, advantages=advantages)
    token_log_ratio = torch.where(mask, logp - logp_old.detach(), 0.0)
    sequence = token_log_ratio.sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)
    log_ratio = torch.where(mask, sequence.detach() + logp - logp.detach(), 0.0)
    return _clipped_surrogate(log_ratio, advantages, mask, options, weights)


PolicyLoss = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
POLICY_LOSSES: dict[str, PolicyLoss] = {"ppo": ppo_policy_loss, "gspo": gspo_policy_loss}


def _truncated(ratio: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    return ratio.clamp(max=cap), ratio > cap


def _icepop(ratio: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    inside = (ratio >= 1.0 / cap) & (ratio <= cap)
    return torch.where(inside, ratio, 0.0), ~inside


# Corrections of the mismatch between the sampler's log-probs and the training forward's
# (rl.is_correction): none; tis, truncated importance sampling (Yao et al., 2025: each token's
# loss weighted by min(pi_train / pi_sampler, cap)); icepop (the ratio as weight inside
# [1/cap, cap], the token dropped outside it). Each gives (weights, corrected).
IS_CORRECTIONS: dict[str, Optional[Callable]] = {"none": None, "tis": _truncated,
                                                 "icepop": _icepop}


def importance_weights(logp_train: torch.Tensor, logp_sampler: torch.Tensor,
                       mask: torch.Tensor, method: str = "none", cap: float = 2.0
                       ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """Per-token weights ``pi_train / pi_sampler`` corrected by ``method`` (None for none),
    and detached sums of the raw ratio: ``tokens``, ``ratio_sum``, ``ratio_max``, and
    ``corrected_sum`` (tokens whose weight the method changed: truncated or dropped)."""
    if method not in IS_CORRECTIONS:
        raise ValueError(f"unknown importance correction {method!r}; one of "
                         f"{tuple(IS_CORRECTIONS)}")
    check_positive(cap=cap)
    _check_shapes(mask, logp_train=logp_train, logp_sampler=logp_sampler)
    ratio = torch.where(mask, (logp_train - logp_sampler).detach(), 0.0).exp()
    correct = IS_CORRECTIONS[method]
    weights, corrected = correct(ratio, cap) if correct else (None, torch.zeros_like(mask))
    stats = {"tokens": mask.sum().float(), "ratio_sum": torch.where(mask, ratio, 0.0).sum(),
             "ratio_max": (torch.where(mask, ratio, 0.0).amax() if ratio.numel()
                           else ratio.new_zeros(())),
             "corrected_sum": (mask & corrected).sum().float()}
    return weights, stats


def entropy_bonus(entropy: torch.Tensor, mask: torch.Tensor, coef: float,
                  agg: str = "token-mean") -> torch.Tensor:
    """``-coef`` x the entropy summed as the policy loss is (the same count): added to the
    loss, so minimising it raises the policy's entropy."""
    if not coef >= 0:
        raise ValueError(f"coef must be >= 0, got {coef}")
    _check_shapes(mask, entropy=entropy)
    return -coef * aggregate(entropy, mask, agg)


def should_skip_minibatch(ratio_mean: float, threshold: float = 10.0) -> bool:
    """Skip the update when the mean ``rho`` exceeds ``threshold``: the policy has drifted
    too far from the rollout for the samples to be trusted. A NaN mean also skips."""
    check_positive(threshold=threshold)
    ratio_mean = float(ratio_mean)  # also takes a 0-d tensor of all-reduced sums
    return math.isnan(ratio_mean) or ratio_mean > threshold
