"""GRPO and RLOO in the same codebase: several samples per prompt, no critic, no GVM.

    torchrun --nproc-per-node N -m megatron_dvpo.rl.grpo --config FILE \
        grpo.reward_model=DIR|grpo.scorer=SPEC rollout.n_samples=4 [grpo.estimator=grpo|rloo]

The same RL job with another scorer and estimator (docs/algorithm.md §3): a frozen
Bradley-Terry reward model, or the user's function of the text (``grpo.scorer``, a scorer spec
as ``rl.true_reward``), scores each response, and each response's advantage is its reward
against the other samples of its prompt (group-normalised for GRPO, leave-one-out for RLOO),
minus ``beta`` times its summed KL to the reference when ``rl.kl_coef > 0``. The advantages are
not whitened again over the batch.
"""

from __future__ import annotations

from megatron_dvpo.config import ConfigError, RunConfig
from megatron_dvpo.rl.rewards import load_scorer
from megatron_dvpo.rl.scorers import RewardModelScorer, TextScorer
from megatron_dvpo.rl.trainer import RLAlgorithm
from megatron_dvpo.training.cli import run_trainer


def _check(cfg: RunConfig) -> None:
    if bool(cfg.grpo.reward_model) == bool(cfg.grpo.scorer):
        raise ConfigError("set exactly one of grpo.reward_model (a reward model checkpoint) and "
                          "grpo.scorer (a function of the text)")
    load_scorer(cfg.grpo.scorer, "grpo.scorer")  # imported and probed before any work
    if cfg.rollout.n_samples < 2:
        raise ConfigError(f"grpo.estimator={cfg.grpo.estimator} compares the samples of a "
                          f"prompt: set rollout.n_samples >= 2 (got {cfg.rollout.n_samples})")


GRPO = RLAlgorithm(
    name="GRPO",
    value_keys=lambda cfg: ("grpo.reward_model",) if cfg.grpo.reward_model else (),
    scorer=lambda cfg: TextScorer if cfg.grpo.scorer else RewardModelScorer,
    make_scorer=lambda cfg, value_cfgs, total: (
        TextScorer(cfg) if cfg.grpo.scorer else
        RewardModelScorer(cfg, value_cfgs["grpo.reward_model"], cfg.grpo.reward_model)),
    estimator=lambda cfg: cfg.grpo.estimator,
    needs_reference=lambda cfg: cfg.rl.kl_coef > 0,
    check=_check,
)


def main(argv=None) -> None:
    run_trainer(GRPO, __doc__.splitlines()[0], argv, GRPO.check_inputs)


if __name__ == "__main__":
    main()
