"""Policy, critic, reward-model and DPO losses (docs/algorithm.md §2-3, "Policy-loss options").

Pure torch functions on one microbatch; nothing here communicates. Per-token tensors are
response-aligned ``[B, T]`` next to a bool ``mask``. A token loss is aggregated by
``aggregate``: its sum (over tokens, or over per-response means) divided by ``normalizer`` when
given (the trainer passes the global minibatch count ``aggregation_count`` gives, so
microbatches and data-parallel ranks add up to the documented mean) and by this batch's own
count otherwise. Stats are detached sums, ready to stack and all-reduce.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megatron_dvpo.rl.advantages import _check_shapes

__all__ = ["ppo_policy_loss", "entropy_bonus", "value_loss_clipped", "bradley_terry_loss",
           "dpo_loss", "should_skip_minibatch", "aggregate", "aggregation_count", "AGGREGATIONS",
           "importance_weights", "IS_CORRECTIONS", "DPO_LOSSES"]

# How a token loss becomes one number (rl.loss_agg_mode), as verl names them: every response
# token weighs the same; every response weighs the same (its tokens' mean); every response's
# summed loss, averaged over responses; summed losses over responses x a constant horizon
# (Dr. GRPO's normaliser, rollout.max_new_tokens), which weighs no response by its length.
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                "seq-mean-token-sum-norm")


def _check_positive(**params: float | None) -> None:
    for name, value in params.items():
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")


def aggregation_count(mask: torch.Tensor, mode: str = "token-mean", horizon: int = 1
                      ) -> torch.Tensor:
    """What ``aggregate``'s sum is divided by, for this batch: its valid tokens, its responses,
    or its responses x ``horizon``."""
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}; one of {AGGREGATIONS}")
    if mode == "token-mean":
        return mask.sum()
    rows = torch.tensor(float(mask.shape[0]), device=mask.device)
    return rows * horizon if mode == "seq-mean-token-sum-norm" else rows


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
              normalizer: float | None = None, horizon: int = 1) -> torch.Tensor:
    """``per_token`` summed the way ``mode`` says, divided by ``normalizer`` or else by this
    batch's ``aggregation_count`` (an empty mask gives 0 rather than NaN, without a host
    sync)."""
    count = aggregation_count(mask, mode, horizon)
    masked = torch.where(mask, per_token, 0.0)
    if mode == "seq-mean-token-mean":
        total = (masked.sum(1) / mask.sum(1).clamp(min=1)).sum()
    else:
        total = masked.sum()
    if normalizer is not None:
        return total / normalizer
    return total / count.clamp(min=1)


def _reduce(per_token: torch.Tensor, mask: torch.Tensor,
            normalizer: float | None) -> torch.Tensor:
    return aggregate(per_token, mask, "token-mean", normalizer)


def ppo_policy_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip_eps: float = 0.2, normalizer: float | None = None,
                    *, dual_clip: float | None = None, log_ratio_clamp: float | None = None,
                    agg: str = "token-mean", horizon: int = 1,
                    weights: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate ``-min(rho * A, clip(rho, 1 - eps, 1 + eps) * A)`` per token,
    aggregated by ``agg`` (``aggregate``).

    ``rho = exp(logp - logp_old)``; the gradient reaches ``logp`` only. Where the clipped branch
    is active the token contributes a constant, so the update cannot push ``rho`` further out.
    Padding is zeroed before the ``exp``, so junk there can neither overflow nor leak a NaN
    gradient. ``log_ratio_clamp`` bounds ``log rho`` to ``[-c, c]`` first (at a log-ratio of 25
    and A = -1 the loss would otherwise be 7.2e10). ``dual_clip`` (Ye et al., 2020; verl's
    ``clip_ratio_c``) caps a negative advantage's loss at ``-c * A``, so that a token whose
    probability rose far above the rollout's cannot dominate. ``weights`` (detached) multiply
    each token's loss: a rollout/training importance correction (``importance_weights``).

    ``stats``: ``tokens``, ``clipfrac_sum`` (tokens whose unclipped objective exceeds the
    clipped one, i.e. the clip is active), ``dual_clipfrac_sum`` (tokens held by the dual
    clip), ``ratio_sum`` (of ``rho``) and ``approx_kl_sum`` of ``(rho - 1) - log(rho)`` per
    token: Schulman's low-variance, non-negative, unbiased estimator of
    ``KL(pi_old || pi_theta)`` on tokens sampled from ``pi_old``.
    """
    _check_positive(clip_eps=clip_eps, normalizer=normalizer, log_ratio_clamp=log_ratio_clamp)
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    _check_shapes(mask, logp=logp, logp_old=logp_old, advantages=advantages)
    log_ratio = torch.where(mask, logp - logp_old.detach(), 0.0)
    if log_ratio_clamp is not None:
        log_ratio = log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = log_ratio.exp()
    advantages = torch.where(mask, advantages.detach(), 0.0)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    dual = torch.zeros_like(mask)
    if dual_clip is not None:
        dual = mask & (advantages < 0) & (per_token > -dual_clip * advantages)
        per_token = torch.where(dual, -dual_clip * advantages, per_token)
    if weights is not None:
        per_token = per_token * weights.detach()
    loss = aggregate(per_token, mask, agg, normalizer, horizon)
    with torch.no_grad():
        stats = {
            "tokens": mask.sum(),
            "clipfrac_sum": (mask & (unclipped > clipped)).sum(),
            "dual_clipfrac_sum": dual.sum(),
            "approx_kl_sum": torch.where(mask, (ratio - 1.0) - log_ratio, 0.0).sum(),
            "ratio_sum": torch.where(mask, ratio, 0.0).sum(),
        }
        stats = {k: v.detach().to(loss.dtype) for k, v in stats.items()}
    return loss, stats


# Corrections of the mismatch between the sampler's log-probs and the training forward's
# (rl.is_correction): none; tis, truncated importance sampling (Yao et al., 2025: each token's
# loss weighted by min(pi_train / pi_sampler, cap)); icepop (the ratio as weight inside
# [1/cap, cap], the token dropped outside it).
IS_CORRECTIONS = ("none", "tis", "icepop")


def importance_weights(logp_train: torch.Tensor, logp_sampler: torch.Tensor,
                       mask: torch.Tensor, method: str = "none", cap: float = 2.0
                       ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """Per-token weights ``pi_train / pi_sampler`` corrected by ``method`` (None for none),
    and detached sums of the raw ratio: ``tokens``, ``ratio_sum``, ``ratio_max``, and
    ``corrected_sum`` (tokens whose weight the method changed: truncated or dropped)."""
    if method not in IS_CORRECTIONS:
        raise ValueError(f"unknown importance correction {method!r}; one of {IS_CORRECTIONS}")
    _check_positive(cap=cap)
    _check_shapes(mask, logp_train=logp_train, logp_sampler=logp_sampler)
    ratio = torch.where(mask, (logp_train - logp_sampler).detach(), 0.0).exp()
    if method == "tis":
        weights, corrected = ratio.clamp(max=cap), ratio > cap
    elif method == "icepop":
        inside = (ratio >= 1.0 / cap) & (ratio <= cap)
        weights, corrected = torch.where(inside, ratio, 0.0), ~inside
    else:
        weights, corrected = None, torch.zeros_like(mask)
    stats = {"tokens": mask.sum().float(), "ratio_sum": torch.where(mask, ratio, 0.0).sum(),
             "ratio_max": (torch.where(mask, ratio, 0.0).amax() if ratio.numel()
                           else ratio.new_zeros(())),
             "corrected_sum": (mask & corrected).sum().float()}
    return weights, stats


def entropy_bonus(entropy: torch.Tensor, mask: torch.Tensor, coef: float,
                  normalizer: float | None = None, agg: str = "token-mean",
                  horizon: int = 1) -> torch.Tensor:
    """``-coef`` x the entropy aggregated as the policy loss is: added to the loss, so
    minimising it raises the policy's entropy. ``entropy`` comes from the vocab-parallel
    computation in the trainer."""
    if not coef >= 0:
        raise ValueError(f"coef must be >= 0, got {coef}")
    _check_positive(normalizer=normalizer)
    _check_shapes(mask, entropy=entropy)
    return -coef * aggregate(entropy, mask, agg, normalizer, horizon)


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


# DPO's losses on the margin of implicit rewards (dpo.loss): sigmoid, Rafailov et al. 2023 (with
# dpo.label_smoothing, conservative DPO); ipo, Azar et al. 2023.
DPO_LOSSES = ("sigmoid", "ipo")


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
    _check_positive(beta=beta)
    if loss not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss {loss!r}; one of {DPO_LOSSES}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_reward = beta * (chosen - ref_chosen.detach())
    rejected_reward = beta * (rejected - ref_rejected.detach())
    margin = chosen_reward - rejected_reward
    if loss == "ipo":
        value = (margin / beta - 1.0 / (2.0 * beta)).square().sum()
    else:
        value = (-(1.0 - label_smoothing) * F.logsigmoid(margin)
                 - label_smoothing * F.logsigmoid(-margin)).sum()
    with torch.no_grad():
        stats = {"correct": _ranked_right(margin).sum(),
                 "margin_sum": margin.sum(), "chosen_reward_sum": chosen_reward.sum(),
                 "rejected_reward_sum": rejected_reward.sum()}
    return value, stats


def should_skip_minibatch(ratio_mean: float, threshold: float = 10.0) -> bool:
    """Skip the update when the mean ``rho`` exceeds ``threshold``: the policy has drifted
    too far from the rollout for the samples to be trusted. A NaN mean also skips."""
    _check_positive(threshold=threshold)
    ratio_mean = float(ratio_mean)  # also takes a 0-d tensor of all-reduced sums
    return math.isnan(ratio_mean) or ratio_mean > threshold
