"""Advantage estimators, whitening and KL control for DVPO and the PPO baseline
(docs/algorithm.md §2-3).

Pure torch functions on response-aligned tensors; nothing here communicates. Every per-token
tensor is ``[B, T]`` with position ``t`` holding response token ``y_t``, next to a bool
``mask [B, T]`` that is a non-empty prefix per row (right padding). From the frozen GVM come
``q [B, T]`` (``q_t``) and ``q_prompt [B]`` (``q_{-1}``, the value of the last prompt token,
i.e. ``V(s_0)``). Padded entries of every output are 0, whatever the inputs hold there.

Advantages and returns are constants for the policy and value losses, so the estimators detach
their inputs and compute in at least float32 (bf16 log-probs would otherwise round the KL).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

__all__ = ["ESTIMATORS", "WHITEN_EPS", "kl_penalty", "td_advantages", "q_advantages", "gae",
           "released_value_whitening", "gae_advantages", "compute_advantages", "masked_moments",
           "whiten_with_moments", "whiten", "AdaptiveKLController", "FixedKLController"]

ESTIMATORS = ("td", "q", "gae")

# Added to the population std before dividing, in both the per-sequence value whitening and the
# global advantage whitening: a row or batch of equal values whitens to 0 instead of NaN.
WHITEN_EPS = 1e-8


def _check_shapes(mask: torch.Tensor, **tensors: torch.Tensor) -> None:
    """``mask`` is a 2-D bool tensor and every named tensor has its shape."""
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(f"mask must be a 2-D bool tensor, got {mask.dtype} {tuple(mask.shape)}")
    for name, tensor in tensors.items():
        if tensor.shape != mask.shape:
            raise ValueError(f"{name} {tuple(tensor.shape)} and mask {tuple(mask.shape)} must "
                             "have the same shape")


def _prefix_lengths(mask: torch.Tensor) -> torch.Tensor:
    """Per-row response lengths; the estimators shift along ``t``, so the mask must be a
    non-empty prefix per row (a right-padded response)."""
    lengths = mask.sum(1)
    prefix = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0) < lengths.unsqueeze(1)
    if mask.shape[0] == 0 or not torch.equal(prefix, mask) or bool((lengths == 0).any()):
        raise ValueError("each mask row must be a non-empty prefix (response tokens then padding)")
    return lengths


def _check_prompt_values(q_prompt: torch.Tensor, batch: int) -> None:
    if q_prompt.shape != (batch,):
        raise ValueError(f"q_prompt must have shape ({batch},), got {tuple(q_prompt.shape)}")


def _check_unit_interval(**params: float) -> None:
    for name, value in params.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")


def _constant(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Detached copies in a common dtype of at least float32."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return [tensor.detach().to(dtype) for tensor in tensors]


def _previous_values(q: torch.Tensor, q_prompt: torch.Tensor) -> torch.Tensor:
    """``[q_{-1}, q_0, .., q_{T-2}]``: ``V(s_t) = q_{t-1}``, the value of the state before ``y_t``.
    """
    return torch.cat([q_prompt.unsqueeze(1), q[:, :-1]], dim=1)


# Schulman's single-sample estimators of KL(pi_old || pi_ref) from d = logp_old - logp_ref
# (rl.kl_estimator; verl's kl, mse, low_var_kl):
# - k1: d, unbiased, as the released code uses; it can be negative on a token;
# - k2: d^2 / 2, biased, low variance, never negative;
# - k3: exp(-d) - 1 + d, unbiased and never negative.
KL_ESTIMATORS = {"k1": lambda d: d, "k2": lambda d: 0.5 * d.square(),
                 "k3": lambda d: torch.expm1(-d) + d}


def kl_penalty(logp_old: torch.Tensor, logp_ref: torch.Tensor,
               mask: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of ``KL(pi_old || pi_ref)`` on the sampled token (``KL_ESTIMATORS``),
    0 at padding."""
    _check_shapes(mask, logp_old=logp_old, logp_ref=logp_ref)
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; one of {tuple(KL_ESTIMATORS)}")
    logp_old, logp_ref = _constant(logp_old, logp_ref)
    d = torch.where(mask, logp_old - logp_ref, 0.0)
    return torch.where(mask, KL_ESTIMATORS[estimator](d), 0.0)


def length_rewards(mask: torch.Tensor, ended: torch.Tensor, truncated: torch.Tensor,
                   per_token: float, truncation: float) -> torch.Tensor:
    """[B, T] rewards that make length a choice: ``-per_token`` at every response token that
    is not its EOS (``ended`` [B, T] marks those), so that with any lambda, 0 included, ending
    is worth ``per_token`` more than going on; ``-truncation`` more at the last token of each
    ``truncated`` [B] response."""
    rewards = torch.where(mask & ~ended, -per_token, 0.0)
    last = (mask.sum(1) - 1).clamp(min=0).unsqueeze(1)
    cut = torch.where(truncated, -truncation, 0.0).to(rewards.dtype).unsqueeze(1)
    return rewards.scatter_add(1, last, cut)


def td_advantages(q: torch.Tensor, q_prompt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``A_t = q_t - q_{t-1}`` with ``q_{-1} = q_prompt``: the GVM's one-step advantage.

    A row sums to ``q_{T-1} - q_{-1}``, the predicted final reward minus the prompt baseline,
    so the response as a whole is credited exactly what the GVM thinks it gained.
    """
    _check_shapes(mask, q=q)
    _prefix_lengths(mask)
    _check_prompt_values(q_prompt, q.shape[0])
    q, q_prompt = _constant(q, q_prompt)
    return torch.where(mask, q - _previous_values(q, q_prompt), 0.0)


def q_advantages(q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``A_t = q_t``: the frozen action value used directly, as in the paper's text."""
    _check_shapes(mask, q=q)
    _prefix_lengths(mask)
    (q,) = _constant(q)
    return torch.where(mask, q, 0.0)


def gae(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(gamma, lambda) advantages and returns ``A + V``, both ``[B, T]`` and 0 at padding.

    ``values[b, t] = V(s_t)``, the value of the state before token ``y_t``, and ``rewards[b, t]``
    the reward for emitting it. After the last token the episode ends, so ``V(s_T) := 0``:
    ``delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)`` and ``A_t = delta_t + gamma * lam * A_{t+1}``.
    Generic on purpose: DVPO's gae mode and the PPO baseline's critic both call it.
    """
    _check_unit_interval(gamma=gamma, lam=lam)
    _check_shapes(mask, values=values, rewards=rewards)
    _prefix_lengths(mask)
    values, rewards = _constant(values, rewards)
    values = torch.where(mask, values, 0.0)
    rewards = torch.where(mask, rewards, 0.0)
    # Padding reads as V = 0 and A = 0, which is exactly the bootstrap after each row's last token.
    next_values = torch.cat([values[:, 1:], values.new_zeros(values.shape[0], 1)], dim=1)
    deltas = rewards + gamma * next_values - values
    advantages = torch.zeros_like(values)
    running = values.new_zeros(values.shape[0])
    for t in range(values.shape[1] - 1, -1, -1):
        running = torch.where(mask[:, t], deltas[:, t] + gamma * lam * running, 0.0)
        advantages[:, t] = running
    returns = torch.where(mask, advantages + values, 0.0)
    return advantages, returns


def _whiten_rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row, ``(x - mean) / (std + WHITEN_EPS)`` over its valid entries; population std."""
    count = mask.sum(1, keepdim=True)
    mean = torch.where(mask, x, 0.0).sum(1, keepdim=True) / count
    var = torch.where(mask, (x - mean).square(), 0.0).sum(1, keepdim=True) / count
    return torch.where(mask, (x - mean) / (var.sqrt() + WHITEN_EPS), 0.0)


def released_value_whitening(values: torch.Tensor, chunk_rows: int) -> torch.Tensor:
    """The released code's whitening of raw GVM outputs ``[B, S]``, one forward chunk of
    ``chunk_rows`` rows at a time: TRL's ``whiten`` over every entry of the chunk (prompt
    positions, padding and the last position included), mean and unbiased variance,
    ``(v - mean) * rsqrt(var + 1e-8)``. The caller then reads ``V(s_t)`` from the result."""
    if chunk_rows < 1 or values.dim() != 2:
        raise ValueError(f"need [B, S] values and chunk_rows >= 1, got {tuple(values.shape)} "
                         f"and {chunk_rows}")
    out = []
    for chunk in values.detach().to(torch.promote_types(values.dtype, torch.float32)).split(
            chunk_rows):
        mean, var = chunk.mean(), chunk.var(unbiased=True)
        out.append((chunk - mean) * torch.rsqrt(var + WHITEN_EPS))
    return torch.cat(out)


def gae_advantages(q: torch.Tensor, q_prompt: torch.Tensor, mask: torch.Tensor,
                   rewards: torch.Tensor, gamma: float, lam: float,
                   whiten_values: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """DVPO's gae mode, the released code's estimator: GAE over the GVM's state values.

    ``V(s_t) = q_{t-1}`` (``V(s_0) = q_prompt``, ``V(s_1) = q_0``, ...), so a row of ``n`` tokens
    uses ``q_{-1} .. q_{n-2}``. With ``whiten_values`` (``dvpo.value_whitening=
    per_sequence_states``; not the released code's, see ``released_value_whitening``) those
    ``n`` values are whitened per sequence, ``(V - mean) / (std + 1e-8)`` with the population
    std over the row's valid positions. The caller builds ``rewards`` (in DVPO only the KL
    penalty). Returns are ``A + V`` with the values GAE ran on.
    """
    _check_shapes(mask, q=q, rewards=rewards)
    _prefix_lengths(mask)
    _check_prompt_values(q_prompt, q.shape[0])
    q, q_prompt = _constant(q, q_prompt)
    values = torch.where(mask, _previous_values(q, q_prompt), 0.0)
    if whiten_values:
        values = _whiten_rows(values, mask)
    return gae(values, rewards, mask, gamma, lam)


def compute_advantages(estimator: str, q: torch.Tensor, q_prompt: torch.Tensor,
                       mask: torch.Tensor, logp_old: torch.Tensor | None = None,
                       logp_ref: torch.Tensor | None = None, beta: float = 0.0,
                       gamma: float = 1.0, lam: float = 0.95, whiten_values: bool = True,
                       kl_estimator: str = "k1", extra_rewards: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Advantages ``[B, T]`` of one rollout batch by ``estimator`` (``td``, ``q`` or ``gae``).

    The KL penalty ``-beta * k_t`` (``kl_penalty``'s ``kl_estimator``, by default ``k1 =
    logp_old - logp_ref``) applies only when ``beta > 0`` and a reference is given (no
    reference model is loaded when ``kl_coef = 0``). For ``td`` and ``q`` it is added to
    ``A_t``; for ``gae`` it is the whole reward (all zeros without it), and
    ``gamma``/``lam``/``whiten_values`` (per-sequence state values) matter only there.
    ``extra_rewards`` [B, T] (``length_rewards``) join the KL penalty wherever it goes. Global
    whitening is left to the caller (``whiten``).

    ``stats`` holds detached sums ready to stack and all-reduce: ``tokens``, ``rows``,
    ``adv_sum``, ``adv_sq_sum`` and ``final_value_sum`` (``q_{T-1}`` over rows); with a
    reference also ``kl_sum`` and ``kl_mean`` (this batch's per-token mean of the estimate).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if not beta >= 0.0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if logp_ref is not None and logp_old is None:
        raise ValueError("logp_ref needs logp_old: the KL penalty is logp_old - logp_ref")
    kl = (kl_penalty(logp_old, logp_ref, mask, kl_estimator) if logp_ref is not None
          else None)
    shaping = -beta * kl if kl is not None and beta > 0 else None
    if extra_rewards is not None:
        shaping = extra_rewards if shaping is None else shaping + extra_rewards
    if estimator == "gae":
        rewards = shaping if shaping is not None else torch.zeros_like(q, dtype=torch.float32)
        advantages, _ = gae_advantages(q, q_prompt, mask, rewards, gamma, lam, whiten_values)
    else:
        advantages = (td_advantages(q, q_prompt, mask) if estimator == "td"
                      else q_advantages(q, mask))
        if shaping is not None:
            advantages = advantages + shaping
    with torch.no_grad():
        tokens = mask.sum()
        last = (mask.sum(1) - 1).unsqueeze(1)
        stats = {
            "tokens": tokens.to(advantages.dtype),
            "rows": torch.tensor(q.shape[0], dtype=advantages.dtype, device=q.device),
            "adv_sum": advantages.sum(),
            "adv_sq_sum": advantages.square().sum(),
            "final_value_sum": q.detach().gather(1, last).sum().to(advantages.dtype),
        }
        if kl is not None:
            stats["kl_sum"] = kl.sum().to(advantages.dtype)
            stats["kl_mean"] = stats["kl_sum"] / stats["tokens"]
    return advantages, stats


def masked_moments(x: torch.Tensor, mask: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sum, sum_sq, count)`` of the valid entries of ``x``, as float64 0-d tensors.

    Sums, not a mean and std, so a data-parallel caller can all-reduce them (stacked, one
    call) and whiten over the global batch; float64 keeps ``sum_sq / n - mean^2`` accurate.
    """
    _check_shapes(mask, x=x)
    x = torch.where(mask, x.to(torch.float64), 0.0)
    return x.sum(), x.square().sum(), mask.sum().to(torch.float64)


def whiten_with_moments(x: torch.Tensor, mask: torch.Tensor, sum: torch.Tensor,
                        sum_sq: torch.Tensor, count: torch.Tensor,
                        shift_mean: bool = True) -> torch.Tensor:
    """``(x - mean) / (std + 1e-8)`` from precomputed (possibly all-reduced) moments.

    ``std`` is the population std, ``sqrt(sum_sq / count - mean^2)``. With ``shift_mean=False``
    the mean is added back: only the scale is normalised. Padding stays 0; the result has the
    dtype of ``x`` (at least float32).
    """
    _check_shapes(mask, x=x)
    if not float(count) > 0:
        raise ValueError(f"cannot whiten without valid entries, got count={float(count)}")
    mean = sum / count
    std = (sum_sq / count - mean.square()).clamp(min=0.0).sqrt()
    out = (x.to(torch.float64) - mean) / (std + WHITEN_EPS)
    if not shift_mean:
        out = out + mean
    dtype = torch.promote_types(x.dtype, torch.float32)
    return torch.where(mask, out, 0.0).to(dtype)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Mean 0, std 1 (population, ``+1e-8``) over all valid entries of this batch; padding 0.

    For the global-batch whitening of docs/algorithm.md across ranks, all-reduce
    ``masked_moments`` and call ``whiten_with_moments``; on one rank the two agree.
    """
    return whiten_with_moments(x, mask, *masked_moments(x, mask), shift_mean=shift_mean)


class AdaptiveKLController:
    """``beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)`` (algorithm §2).

    ``KL`` is the mean over the step's ``n`` sequences of each one's summed per-token KL, the
    quantity the released code's (and TRL's) default target of 6 nats is defined on.

    The clip bounds the step whatever the KL spike, and ``n / horizon`` makes the rate
    proportional to the samples seen: over ``horizon`` samples at a steady clipped error ``e``,
    beta changes by a factor of about ``exp(e)``, so by at most about 22%.
    """

    def __init__(self, init_beta: float, target: float, horizon: float) -> None:
        if not init_beta >= 0.0:
            raise ValueError(f"init_beta must be >= 0, got {init_beta}")
        if not target > 0.0:
            raise ValueError(f"target KL must be > 0, got {target}")
        if not horizon > 0.0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.beta = float(init_beta)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move beta toward the target after ``n_steps`` sequences whose summed KL averages
        ``current_kl``."""
        if not math.isfinite(current_kl):
            raise ValueError(f"current_kl must be finite, got {current_kl}")
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0, got {n_steps}")
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        factor = 1.0 + error * n_steps / self.horizon
        if factor < 0.0:
            raise ValueError(f"n_steps={n_steps} over horizon={self.horizon} would make beta "
                             "negative; use n_steps <= 5 * horizon")
        self.beta *= factor

    def state_dict(self) -> dict[str, float]:
        return {"beta": self.beta}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore beta; target and horizon stay as configured for this run."""
        if "beta" not in state:
            raise KeyError(f"KL controller state needs 'beta', got keys {sorted(state)}")
        self.beta = float(state["beta"])


class FixedKLController:
    """A constant beta with ``AdaptiveKLController``'s interface, so the trainer needs no branch."""

    def __init__(self, beta: float) -> None:
        if not beta >= 0.0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.beta = float(beta)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt."""

    def state_dict(self) -> dict[str, float]:
        return {"beta": self.beta}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Keep the configured beta: for a fixed controller it is configuration, not state."""


def group_advantages(rewards: torch.Tensor, group_size: int, method: str,
                     eps: float = 1e-6) -> torch.Tensor:
    """[B] outcome advantages of ``group_size`` consecutive samples of each prompt.

    ``grpo``: ``(r_i - mean_g) / (std_g + eps)`` with the group's unbiased std (DeepSeekMath's
    GRPO); ``dr_grpo``: ``r_i - mean_g``, no std (Liu et al., 2025: the std favours groups of
    nearly equal rewards); ``rloo``: ``r_i - mean_{j != i} r_j``, the leave-one-out baseline
    (Ahmadian et al., 2024), which is ``n / (n - 1) * (r_i - mean_g)``. A group of one has
    advantage 0, and so has a tied group, exactly: computed in fp64, and the rounding of a tied
    group's mean never divided by its zero std (in fp32 8 rewards of 0.7 got +0.056 each).
    """
    if rewards.shape[0] % group_size:
        raise ValueError(f"{rewards.shape[0]} rewards do not split into groups of {group_size}")
    if group_size == 1:
        return torch.zeros_like(rewards, dtype=torch.float32)
    groups = rewards.double().view(-1, group_size)
    tied = groups.amax(1, keepdim=True) == groups.amin(1, keepdim=True)
    centred = torch.where(tied, 0.0, groups - groups.mean(1, keepdim=True))
    if method == "grpo":
        out = centred / (groups.std(1, keepdim=True) + eps)
    elif method == "dr_grpo":
        out = centred
    elif method == "rloo":
        out = centred * group_size / (group_size - 1)
    else:
        raise ValueError(f"unknown group method {method!r}")
    return out.float().view(-1)
