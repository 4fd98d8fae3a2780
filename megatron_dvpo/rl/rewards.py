"""The true reward of a response, for tasks that have one (``eval/true_reward_mean``)."""

from __future__ import annotations

from typing import Callable, Optional

from megatron_dvpo.config import ConfigError

TrueReward = Callable[[str, str], float]  # (prompt text, response text) -> reward


def true_reward_scorer(spec: Optional[str], key: str = "rl.true_reward") -> Optional[TrueReward]:
    """``synthetic:<rule seed>``: the hidden rule of the built-in synthetic task."""
    if not spec:
        return None
    kind, _, seed = spec.partition(":")
    if kind != "synthetic" or not seed.isdigit():
        raise ConfigError(f"{key}={spec!r}: expected 'synthetic:<rule seed>'")
    from megatron_dvpo.data.synthetic import SyntheticRule

    return SyntheticRule(seed=int(seed)).score
