"""Advantage estimators by name: the one place a new estimator is added (as verl's core_algos).

Each takes what the scorer said about a rollout (``Scores``) and the per-token inputs shared by
every estimator (``EstimatorInputs``), and returns ``Advantages``. The maths is the pure
functions of ``rl/advantages.py``; docs/algorithm.md §2-3 states each convention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from megatron_dvpo.config import ConfigError
from megatron_dvpo.rl.advantages import compute_advantages, gae, group_advantages, kl_penalty


@dataclass(frozen=True, kw_only=True)
class Scores:
    """What a scorer says about a rollout, identical on every rank of a model-parallel group:
    ``final_value [B]``, its (unwhitened) prediction of each response's reward, logged under
    the scorer's ``final_value_tag``; ``out_of_range [B, T]`` (bool, or None), values outside
    the range the scorer produced on its own training data; a K-head GVM's ``head_spread
    [B, T]`` (the heads' std, 0 past each response) and ``disagrees [B, T]`` (bool: a spread
    above the one it had on its training data), None for other scorers."""

    final_value: torch.Tensor
    out_of_range: Optional[torch.Tensor] = None
    head_spread: Optional[torch.Tensor] = None
    disagrees: Optional[torch.Tensor] = None


@dataclass(frozen=True, kw_only=True)
class GVMScores(Scores):
    """A GVM's Q-view (``q [B, T]``, ``q_prompt [B]``), read as its estimator needs them."""

    q: torch.Tensor
    q_prompt: torch.Tensor


@dataclass(frozen=True, kw_only=True)
class SequenceScores(Scores):
    """One reward per response (a reward model, the user's function of the text)."""

    rewards: torch.Tensor


@dataclass(frozen=True, kw_only=True)
class CriticScores(SequenceScores):
    """A reward per response and a critic's ``state_values [B, T]`` (``V(s_t)``)."""

    state_values: torch.Tensor


@dataclass(frozen=True)
class EstimatorInputs:
    mask: torch.Tensor  # [B, T] response tokens
    logp_old: torch.Tensor  # [B, T] rollout policy's log-probs (tempered)
    logp_ref: Optional[torch.Tensor]  # [B, T] reference's, None without a reference
    beta: float  # KL coefficient
    gamma: float
    lam: float
    whiten_state_values: bool = False  # gae: per-sequence whitening of V(s_t)
    group_size: int = 1  # rollout.n_samples: consecutive rows that share a prompt
    kl_estimator: str = "k1"  # rl.kl_estimator: the per-token KL penalty's estimator
    length_rewards: Optional[torch.Tensor] = None  # [B, T] rl.length_penalty & co., or None


@dataclass(frozen=True)
class Advantages:
    advantages: torch.Tensor  # [B, T], 0 at padding
    returns: Optional[torch.Tensor] = None  # [B, T] GAE's A + V, what a critic is fitted to


def _gvm(estimator: str) -> Callable[[GVMScores, EstimatorInputs], Advantages]:
    """DVPO's estimators over a frozen GVM's Q-view (td, q, gae)."""

    def estimate(scores: GVMScores, x: EstimatorInputs) -> Advantages:
        advantages, _ = compute_advantages(estimator, scores.q, scores.q_prompt, x.mask,
                                           x.logp_old, x.logp_ref, x.beta, x.gamma, x.lam,
                                           x.whiten_state_values, x.kl_estimator,
                                           x.length_rewards)
        return Advantages(advantages)

    return estimate


def gae_with_critic(scores: CriticScores, x: EstimatorInputs) -> Advantages:
    """PPO's: GAE over the critic's ``V(s_t)``, rewards = per-token KL penalty plus the reward
    model's score at the last token."""
    rewards = torch.zeros_like(x.logp_old, dtype=torch.float32)
    if x.logp_ref is not None and x.beta > 0:
        rewards = -x.beta * kl_penalty(x.logp_old, x.logp_ref, x.mask, x.kl_estimator)
    if x.length_rewards is not None:
        rewards = rewards + x.length_rewards
    last = (x.mask.sum(1) - 1).unsqueeze(1)
    rewards = rewards.scatter_add(1, last, scores.rewards.unsqueeze(1).to(rewards.dtype))
    advantages, returns = gae(scores.state_values, rewards, x.mask, x.gamma, x.lam)
    return Advantages(advantages, returns)


def _group(method: str) -> Callable[[SequenceScores, EstimatorInputs], Advantages]:
    """GRPO's and RLOO's (docs/algorithm.md §3): each response's sequence reward, minus
    ``beta`` times its summed KL to the reference (verl's KL-in-reward), against the other
    samples of its prompt; every token of a response gets its advantage."""

    def estimate(scores: SequenceScores, x: EstimatorInputs) -> Advantages:
        rewards = scores.rewards.float()
        if x.logp_ref is not None and x.beta > 0:
            rewards = rewards - x.beta * kl_penalty(x.logp_old, x.logp_ref, x.mask,
                                                    x.kl_estimator).sum(1)
        if x.length_rewards is not None:
            rewards = rewards + x.length_rewards.sum(1)
        per_row = group_advantages(rewards, x.group_size, method)
        return Advantages(per_row[:, None] * x.mask)

    return estimate


@dataclass(frozen=True)
class Estimator:
    """An estimator, the kind of scores it reads, and whether its advantages are already
    normalised within each prompt's group (then never whitened again over the batch)."""

    estimate: Callable[[Scores, EstimatorInputs], Advantages]
    reads: type[Scores]
    grouped: bool = False

    def __call__(self, scores: Scores, x: EstimatorInputs) -> Advantages:
        return self.estimate(scores, x)


ESTIMATORS: dict[str, Estimator] = {
    "td": Estimator(_gvm("td"), GVMScores), "q": Estimator(_gvm("q"), GVMScores),
    "gae": Estimator(_gvm("gae"), GVMScores),
    "gae_critic": Estimator(gae_with_critic, CriticScores),
    "grpo": Estimator(_group("grpo"), SequenceScores, grouped=True),
    "dr_grpo": Estimator(_group("dr_grpo"), SequenceScores, grouped=True),
    "rloo": Estimator(_group("rloo"), SequenceScores, grouped=True),
}


def check_estimator(name: str, scores: type[Scores], scorer: str) -> Estimator:
    """The estimator ``name``, refused (before any model is built) where ``scorer``'s scores,
    of type ``scores``, are not what it reads."""
    if name not in ESTIMATORS:
        raise ConfigError(f"unknown advantage estimator {name!r}; one of {tuple(ESTIMATORS)}")
    estimator = ESTIMATORS[name]
    if not issubclass(scores, estimator.reads):
        raise ConfigError(f"the {name} estimator reads {estimator.reads.__name__}; {scorer} "
                          f"gives {scores.__name__}")
    return estimator
