"""The PPO baseline in the same codebase: reward model + online critic + reference + GAE.

    torchrun --nproc-per-node N -m megatron_dvpo.rl.ppo --config FILE ppo.reward_model=DIR

For side-by-side comparison with DVPO only (docs/algorithm.md §3). It is the same RL job with
another scorer: a frozen Bradley-Terry reward model gives the reward at the last token, a critic
(initialised from the reward model, or ``ppo.critic``, and trained online with the clipped value
loss) gives the values, and GAE runs over rewards = per-token KL penalty + the final reward.
The critic is checkpointed with the policy, so a PPO run resumes exactly as a DVPO run does.
"""

from __future__ import annotations

from megatron_dvpo.config import RunConfig
from megatron_dvpo.rl.scorers import RewardCriticScorer
from megatron_dvpo.rl.trainer import RLAlgorithm
from megatron_dvpo.training.cli import run_trainer


def _default_critic(cfg: RunConfig) -> None:
    cfg.ppo.critic = cfg.ppo.critic or cfg.ppo.reward_model


PPO = RLAlgorithm(
    name="PPO",
    value_keys=lambda cfg: ("ppo.reward_model", "ppo.critic"),
    scorer=lambda cfg: RewardCriticScorer,
    make_scorer=lambda cfg, value_cfgs, total: RewardCriticScorer(
        cfg, value_cfgs["ppo.reward_model"], value_cfgs["ppo.critic"], total),
    estimator=lambda cfg: "gae_critic",
    # docs/algorithm.md §3: the KL penalty's reference, none at rl.kl_coef=0 (as DVPO)
    needs_reference=lambda cfg: cfg.rl.kl_coef > 0,
    prepare=_default_critic,
)


def main(argv=None) -> None:
    run_trainer(PPO, __doc__.splitlines()[0], argv, PPO.check_inputs)


if __name__ == "__main__":
    main()
