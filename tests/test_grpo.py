"""GRPO and RLOO: their advantages against hand-computed values, n samples per prompt, and
GRPO runs from the command line at DP=2 with a reference."""

import math

import pytest
import torch

from conftest import launch
from megatron_dvpo.config import ConfigError, load_config
from megatron_dvpo.demo import scalars
from megatron_dvpo.rl.advantages import group_advantages
from megatron_dvpo.rl.estimators import ESTIMATORS, EstimatorInputs, SequenceScores


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0])
    # groups of 2: centred +-0.5 and +-1.5, unbiased stds 0.7071 and 2.1213
    assert torch.allclose(group_advantages(rewards, 2, "grpo"),
                          torch.tensor([-0.7071, 0.7071, -0.7071, 0.7071]), atol=1e-4)
    assert torch.allclose(group_advantages(rewards, 2, "rloo"), torch.tensor([-1., 1., -3., 3.]))
    # one group of 4: mean 3, unbiased std sqrt(14 / 3); leave-one-out 1 - (2 + 3 + 6) / 3
    assert torch.allclose(group_advantages(rewards, 4, "grpo"),
                          torch.tensor([-2., -1., 0., 3.]) / math.sqrt(14 / 3), atol=1e-5)
    assert torch.allclose(group_advantages(rewards, 4, "rloo"),
                          torch.tensor([1 - 11 / 3, 2 - 10 / 3, 0.0, 6 - 2.0]), atol=1e-5)
    assert torch.equal(group_advantages(rewards, 1, "grpo"), torch.zeros(4))
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, 3, "grpo")


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_group_estimator_subtracts_the_summed_kl_and_fills_every_response_token(method):
    mask = torch.tensor([[True, True, False], [True, True, True]])
    logp_old = torch.tensor([[-1.0, -2.0, -9.0], [-1.0, -1.0, -1.0]])
    logp_ref = torch.tensor([[-1.5, -2.5, 0.0], [-1.0, -1.0, -2.0]])  # KL sums 1.0 and 1.0
    x = EstimatorInputs(mask, logp_old, logp_ref, beta=0.5, gamma=1.0, lam=1.0, group_size=2)
    got = ESTIMATORS[method](SequenceScores(final_value=torch.zeros(2),
                                            rewards=torch.tensor([3.0, 1.0])), x)
    expected = group_advantages(torch.tensor([3.0 - 0.5, 1.0 - 0.5]), 2, method)
    assert torch.allclose(got.advantages, expected[:, None] * mask)
    assert got.advantages[0, 2] == 0 and got.returns is None


def test_grpo_needs_several_samples_per_prompt():
    from megatron_dvpo.rl.grpo import GRPO

    cfg = load_config("examples/dvpo_tiny.yaml", ["grpo.reward_model=x"])
    with pytest.raises(ConfigError, match="rollout.n_samples >= 2"):
        GRPO.check_inputs(cfg)


@pytest.mark.parametrize("overrides, message", [
    ([], "set exactly one of grpo.reward_model"),
    (["grpo.reward_model=x", "grpo.scorer=synthetic:0"], "set exactly one of grpo.reward_model"),
    (["grpo.scorer=no_such_module:fn"], "grpo.scorer='no_such_module:fn': cannot import"),
])
def test_grpo_needs_one_scorer_that_works(overrides, message):
    from megatron_dvpo.rl.grpo import GRPO

    cfg = load_config("examples/dvpo_tiny.yaml", ["rollout.n_samples=4", *overrides])
    with pytest.raises(ConfigError, match=message):
        GRPO.check_inputs(cfg)


def test_only_grpo_takes_a_text_scorer():
    """PPO's reward comes from its reward model: a ppo.scorer key would be silently ignored."""
    with pytest.raises(ConfigError, match="ppo.scorer"):
        load_config("examples/dvpo_tiny.yaml", ["ppo.scorer=synthetic:0"])


@pytest.mark.multirank
@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_group_methods_run_at_dp2_with_a_reference(models, tmp_path, estimator):
    """4 prompts x 4 samples over 2 ranks (each rank's groups its own), KL to the reference."""
    launch(["-m", "megatron_dvpo.rl.grpo", "--config", "examples/dvpo_tiny.yaml",
            f"data.train_path={models.data}/train.jsonl", "data.eval_path=null",
            f"rl.policy={models.policy}", f"grpo.reward_model={models.gvm_init}",
            f"grpo.estimator={estimator}", "rollout.n_samples=4",
            f"logging.run_dir={tmp_path}", "checkpoint.save_dir=null", "train_steps=2",
            "data.global_batch_size=4", "data.micro_batch_size=2", "rl.kl_coef=0.05",
            "logging.log_interval=1", "rl.eval_interval=0", "rl.true_reward=synthetic:0"],
           nproc=2)
    logs = scalars(tmp_path / "tensorboard")
    for tag in ("policy/loss", "rollout/kl_ref", "rollout/true_reward_mean", "policy/approx_kl"):
        assert len(logs[tag]) == 2 and all(math.isfinite(v) for _, v in logs[tag]), tag
    assert "critic/loss" not in logs


@pytest.mark.multirank
def test_a_text_scorer_is_the_group_reward(models, tmp_path):
    """grpo.scorer=synthetic:0 (the task's own rule, as a user's verifier would be): every
    response's reward is its true reward, so their logged means are equal, at DP=2."""
    launch(["-m", "megatron_dvpo.rl.grpo", "--config", "examples/dvpo_tiny.yaml",
            f"data.train_path={models.data}/train.jsonl", "data.eval_path=null",
            f"rl.policy={models.policy}", "grpo.scorer=synthetic:0", "grpo.estimator=rloo",
            "rollout.n_samples=4", f"logging.run_dir={tmp_path}", "checkpoint.save_dir=null",
            "train_steps=2", "data.global_batch_size=4", "data.micro_batch_size=2",
            "rl.kl_coef=0", "logging.log_interval=1", "rl.eval_interval=0",
            "rl.true_reward=synthetic:0"], nproc=2)
    logs = scalars(tmp_path / "tensorboard")
    rewards, true = logs["rollout/scorer_reward_mean"], logs["rollout/true_reward_mean"]
    assert "rollout/gvm_final_value_mean" not in logs  # no GVM here
    assert len(rewards) == 2 and [s for s, _ in rewards] == [s for s, _ in true]
    for (_, got), (_, expected) in zip(rewards, true):
        assert got == pytest.approx(expected, abs=1e-6)
    assert any(v != 0 for _, v in true)  # the rule scored something


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_a_tied_group_has_advantage_exactly_zero(method):
    """Every group size from 2 to 64 and every reward 0.05 .. 9.95, all samples tied: 0, not
    the float32 rounding of the mean over a zero std (8 x 0.7 gave +0.056 each, 64 x 9.9
    gave -0.486); an untied group beside it is unaffected."""
    for size in range(2, 65):
        tied = torch.arange(5, 1000, 10, dtype=torch.float32)[:, None].div(100).expand(-1, size)
        assert torch.equal(group_advantages(tied.reshape(-1), size, method),
                           torch.zeros(tied.numel())), size
    mixed = torch.tensor([0.7] * 8 + [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    out = group_advantages(mixed, 8, method)
    assert torch.equal(out[:8], torch.zeros(8)) and out[8:].abs().min() > 0.05


def test_dr_grpo_centres_without_the_std():
    """Dr. GRPO (Liu et al., 2025): r_i - mean_g, no division by the group's std."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 3.0])
    assert group_advantages(rewards, 4, "dr_grpo").tolist() == pytest.approx(
        [0.0, -1.0, -1.0, 2.0])


def test_an_estimator_is_refused_scores_it_cannot_read():
    """Typed scores: each estimator names the scores it reads, and a scorer that gives others
    is refused before any model is built; a critic's scores carry a reward per response, so
    the group estimators can read them."""
    from megatron_dvpo.rl.estimators import CriticScores, GVMScores, check_estimator

    with pytest.raises(ConfigError, match="the gae_critic estimator reads CriticScores; "
                                          "GVMScorer gives GVMScores"):
        check_estimator("gae_critic", GVMScores, "GVMScorer")
    with pytest.raises(ConfigError, match="the td estimator reads GVMScores; TextScorer gives "
                                          "SequenceScores"):
        check_estimator("td", SequenceScores, "TextScorer")
    assert check_estimator("rloo", CriticScores, "RewardCriticScorer").grouped
    assert not check_estimator("gae", GVMScores, "GVMScorer").grouped
