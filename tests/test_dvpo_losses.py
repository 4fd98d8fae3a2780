"""Policy losses (PPO, GSPO), entropy bonus, value losses, Bradley-Terry loss and the skip rule,
against hand-computed numbers. Losses are sums; ``stats["count"]`` makes them means."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_dvpo.rl.losses import bradley_terry_loss, value_loss_clipped, value_loss_mse
from megatron_dvpo.rl.policy_loss import (PolicyLossOptions, entropy_bonus, gspo_policy_loss,
                                          ppo_policy_loss, should_skip_minibatch)

F64 = torch.float64
MASK = torch.tensor([[True, True, False], [True, True, False]])


def policy_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two 2-token rows and a padded slot, eps = 0.2:

    row 0: A = +1, rho = 1.5 -> min(1.5, 1.2)  = 1.2,  clipped  (loss -1.2)
           A = -2, rho = 0.9 -> min(-1.8, -1.8) = -1.8, inside   (loss  1.8)
    row 1: A = -1, rho = 0.5 -> min(-0.5, -0.8) = -0.8, clipped  (loss  0.8)
           A = +1, rho = 0.5 -> min(0.5, 0.8)   = 0.5,  not clipped: the clip never raises
                                                        the objective            (loss -0.5)
    Padding holds junk log-probs whose ratio would overflow exp.
    """
    logp_old = torch.tensor([[-1.0, -2.0, -900.0], [-0.5, -1.0, -900.0]], dtype=F64)
    log_rho = torch.tensor([[math.log(1.5), math.log(0.9), 0.0],
                            [math.log(0.5), math.log(0.5), 0.0]], dtype=F64)
    logp = (logp_old + log_rho).masked_fill(~MASK, 900.0).requires_grad_()
    advantages = torch.tensor([[1.0, -2.0, 5.0], [-1.0, 1.0, 5.0]], dtype=F64)
    return logp, logp_old, advantages


def test_ppo_policy_loss_by_hand():
    logp, logp_old, advantages = policy_batch()
    loss, stats = ppo_policy_loss(logp, logp_old, advantages, MASK)
    # (-1.2 + 1.8 + 0.8 - 0.5) = 0.9 over 4 tokens
    assert loss.item() == pytest.approx(0.9)
    assert stats["tokens"].item() == 4 and stats["count"].item() == 4
    assert stats["clipfrac_sum"].item() == 2
    assert stats["ratio_sum"].item() == pytest.approx(1.5 + 0.9 + 0.5 + 0.5)
    # (rho - 1) - log(rho): 0.5 - 0.4054651 = 0.0945349; -0.1 + 0.1053605 = 0.0053605;
    # -0.5 + 0.6931472 = 0.1931472 (twice); sum 0.4861898
    assert stats["approx_kl_sum"].item() == pytest.approx(0.4861898, abs=1e-7)
    assert all(not v.requires_grad for v in stats.values())


def test_ppo_policy_loss_sums_add_up_over_microbatches():
    logp, logp_old, advantages = policy_batch()
    parts = [ppo_policy_loss(logp[i:i + 1], logp_old[i:i + 1], advantages[i:i + 1],
                             MASK[i:i + 1]) for i in range(2)]
    assert (parts[0][0] + parts[1][0]).item() == pytest.approx(0.9)
    assert parts[0][1]["count"] + parts[1][1]["count"] == 4


def test_ppo_gradient_is_zero_in_the_clipped_region():
    logp, logp_old, advantages = policy_batch()
    loss, _ = ppo_policy_loss(logp, logp_old, advantages, MASK)
    loss.backward()
    # d(-rho * A)/d logp = -rho * A where unclipped: token (0, 1): -0.9 * -2 = 1.8,
    # token (1, 1): -0.5 * 1 = -0.5; clipped tokens and padding: 0 (and no NaN from the junk).
    assert logp.grad.flatten().tolist() == pytest.approx([0.0, 1.8, 0.0, 0.0, -0.5, 0.0])


def test_ppo_loss_on_policy_is_minus_mean_advantage():
    # rho = 1 everywhere: loss = -sum(A) = -(1 - 2 - 1 + 1), no clipping, zero KL.
    _, logp_old, advantages = policy_batch()
    loss, stats = ppo_policy_loss(logp_old.clone(), logp_old, advantages, MASK)
    assert loss.item() == pytest.approx(1.0)
    assert stats["clipfrac_sum"].item() == 0 and stats["approx_kl_sum"].item() == 0.0
    assert stats["ratio_sum"].item() == 4


def test_entropy_bonus_by_hand():
    entropy = torch.tensor([[1.0, 2.0, 50.0], [3.0, 0.5, 50.0]])
    # -0.01 * (1 + 2 + 3 + 0.5) = -0.065; per response's mean: -0.01 * (1.5 + 1.75)
    assert entropy_bonus(entropy, MASK, 0.01).item() == pytest.approx(-0.065)
    assert entropy_bonus(entropy, MASK, 0.01, "seq-mean-token-mean").item() == \
        pytest.approx(-0.0325)


def test_value_loss_clipped_by_hand():
    # eps = 0.2; tokens (v, v_old, R):
    # a (1.0, 0.5, 1.2): unclipped 0.04; clip(v) = 0.7 -> 0.25; max 0.25, clipped  -> 0.125
    # b (0.3, 0.5, 0.0): unclipped 0.09; clip(v) = 0.3 -> 0.09; equal, not clipped -> 0.045
    # c (0.0, 0.5, 1.0): unclipped 1.0;  clip(v) = 0.3 -> 0.49; max 1.0           -> 0.5
    values = torch.tensor([[1.0, 0.3, 7.0], [0.0, 7.0, 7.0]], dtype=F64, requires_grad=True)
    old_values = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.0, 0.0]], dtype=F64)
    returns = torch.tensor([[1.2, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=F64)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    loss, stats = value_loss_clipped(values, old_values, returns, mask)
    # 0.125 + 0.045 + 0.5 over 3 tokens
    assert loss.item() == pytest.approx(0.67)
    assert stats["tokens"].item() == 3 and stats["clipfrac_sum"].item() == 1
    loss.backward()
    # d/dv 0.5 (v - R)^2 = v - R where unclipped: b: 0.3, c: -1.0; a is clipped: 0.
    assert values.grad.flatten().tolist() == pytest.approx([0.0, 0.3, 0.0, -1.0, 0.0, 0.0])
    # unclipped (ppo.value_loss=mse): 0.5 * (0.04 + 0.09 + 1.0), a's gradient v - R = -0.2 too
    values.grad = None
    loss, stats = value_loss_mse(values, old_values, returns, mask)
    assert loss.item() == pytest.approx(0.565) and stats["clipfrac_sum"] == 0
    loss.backward()
    assert values.grad.flatten().tolist() == pytest.approx([-0.2, 0.3, 0.0, -1.0, 0.0, 0.0])


def test_bradley_terry_loss_by_hand():
    chosen = torch.tensor([2.0, 0.0, 1.0], dtype=F64, requires_grad=True)
    rejected = torch.tensor([1.0, 0.0, 3.0], dtype=F64)
    loss, stats = bradley_terry_loss(chosen, rejected)
    # margins [1, 0, -2]: log(1 + e^-1) = 0.3132617, log 2 = 0.6931472, log(1 + e^2) = 2.1269280
    assert loss.item() == pytest.approx(0.3132617 + 0.6931472 + 2.1269280, abs=1e-7)
    # correct, tie (half), wrong
    assert stats["correct"].item() == pytest.approx(1.5)
    assert stats["margin_sum"].item() == pytest.approx(-1.0)
    loss.backward()
    # d/dm -log sigmoid(m) = -sigmoid(-m): sigmoid(-1) = 0.2689414
    assert chosen.grad[0].item() == pytest.approx(-0.2689414, abs=1e-7)


def test_bradley_terry_loss_is_finite_for_huge_margins():
    loss, stats = bradley_terry_loss(torch.tensor([-1000.0]), torch.tensor([1000.0]))
    assert loss.item() == pytest.approx(2000.0) and stats["correct"].item() == 0.0


@pytest.mark.parametrize("ratio_mean, threshold, skip", [
    (1.02, 10.0, False),
    (10.0, 10.0, False),  # strictly greater skips
    (10.5, 10.0, True),
    (2.5, 2.0, True),
    (float("inf"), 10.0, True),
    (float("nan"), 10.0, True),
    (torch.tensor(12.0, dtype=F64), 10.0, True),
])
def test_skip_rule(ratio_mean, threshold, skip):
    assert should_skip_minibatch(ratio_mean, threshold) is skip


@pytest.mark.parametrize("call, match", [
    (lambda: PolicyLossOptions(clip_eps=0.0), "clip_eps must be positive"),
    (lambda: PolicyLossOptions(dual_clip=1.0), "dual_clip must be > 1"),
    (lambda: PolicyLossOptions(agg="token-sum"), "unknown loss aggregation 'token-sum'"),
    (lambda: ppo_policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 3),
                             torch.ones(1, 2, dtype=torch.bool)), "must have the same shape"),
    (lambda: entropy_bonus(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), -0.1),
     "coef must be >= 0"),
    (lambda: value_loss_clipped(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2),
                                torch.ones(1, 2)), "mask must be a 2-D bool tensor"),
    (lambda: bradley_terry_loss(torch.zeros(2), torch.zeros(3)), r"need two non-empty \[N\]"),
    (lambda: should_skip_minibatch(1.0, threshold=0.0), "threshold must be positive"),
])
def test_invalid_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# -- policy-loss options (docs/algorithm.md §2, "Policy-loss options") ------------------------

def test_loss_aggregations_by_hand():
    """The policy_batch token losses: row 0 (-1.2, 1.8), row 1 (0.8, -0.5); a third row with
    one token of loss 0.6 (A = -0.6, rho = 1) shows the row weights."""
    from megatron_dvpo.rl.policy_loss import aggregate, aggregation_count

    per_token = torch.tensor([[-1.2, 1.8, 9.0], [0.8, -0.5, 9.0], [0.6, 9.0, 9.0]], dtype=F64)
    mask = torch.tensor([[True, True, False], [True, True, False], [True, False, False]])
    expected = {"token-mean": (-1.2 + 1.8 + 0.8 - 0.5 + 0.6) / 5,
                "seq-mean-token-mean": ((0.6 / 2) + (0.3 / 2) + 0.6) / 3,
                "seq-mean-token-sum": (0.6 + 0.3 + 0.6) / 3,
                "seq-mean-token-sum-norm": (0.6 + 0.3 + 0.6) / (3 * 4)}
    assert [aggregation_count(mask, mode, 4).item() for mode in expected] == [5, 3, 3, 12]
    for mode, value in expected.items():
        mean = aggregate(per_token, mask, mode) / aggregation_count(mask, mode, 4)
        assert mean.item() == pytest.approx(value), mode
    # split into microbatches, sums and counts add up: the same mean
    for mode, value in expected.items():
        sums = sum(aggregate(per_token[i:i + 1], mask[i:i + 1], mode) for i in range(3))
        counts = sum(aggregation_count(mask[i:i + 1], mode, 4) for i in range(3))
        assert (sums / counts).item() == pytest.approx(value), mode


def test_dual_clip_caps_a_negative_advantages_loss():
    """A = -1 and rho = 5 (log-ratio ln 5): the clipped surrogate's loss is max(5, 1.2) = 5;
    dual-clip at 3 caps it at 3; a positive advantage is left alone."""
    logp_old = torch.zeros(1, 2, dtype=F64)
    logp = torch.tensor([[math.log(5.0), math.log(5.0)]], dtype=F64)
    advantages = torch.tensor([[-1.0, 1.0]], dtype=F64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    plain, _ = ppo_policy_loss(logp, logp_old, advantages, mask)
    assert plain.item() == pytest.approx(5.0 - 1.2)
    dual, stats = ppo_policy_loss(logp, logp_old, advantages, mask,
                                  PolicyLossOptions(dual_clip=3.0))
    assert dual.item() == pytest.approx(3.0 - 1.2) and stats["dual_clipfrac_sum"] == 1


def test_the_log_ratio_clamp_bounds_a_runaway_ratio():
    """log-ratio 25, A = -1: exp(25) = 7.2e10 unclamped; clamped at 3, exp(3) = 20.1."""
    logp = torch.tensor([[25.0]], dtype=F64)
    zero, mask, minus = torch.zeros(1, 1, dtype=F64), torch.ones(1, 1, dtype=torch.bool), \
        -torch.ones(1, 1, dtype=F64)
    assert ppo_policy_loss(logp, zero, minus, mask)[0].item() == pytest.approx(math.exp(25))
    assert ppo_policy_loss(logp, zero, minus, mask,
                           PolicyLossOptions(log_ratio_clamp=3.0))[0].item() == \
        pytest.approx(math.exp(3))


def test_importance_corrections_by_hand():
    """pi_train / pi_sampler = 0.25, 1, 3 on three tokens, cap 2: tis weights 0.25, 1, 2 (one
    truncated); icepop keeps ratios inside [0.5, 2]: 0, 1, 0 (two dropped)."""
    from megatron_dvpo.rl.policy_loss import importance_weights

    sampler = torch.zeros(1, 4, dtype=F64)
    train = torch.tensor([[math.log(0.25), 0.0, math.log(3.0), 7.0]], dtype=F64)
    mask = torch.tensor([[True, True, True, False]])
    weights, stats = importance_weights(train, sampler, mask, "tis", 2.0)
    assert weights[0, :3].tolist() == pytest.approx([0.25, 1.0, 2.0])
    assert stats["corrected_sum"] == 1 and stats["ratio_max"].item() == pytest.approx(3.0)
    assert stats["ratio_sum"].item() == pytest.approx(4.25) and stats["tokens"] == 3
    weights, stats = importance_weights(train, sampler, mask, "icepop", 2.0)
    assert weights[0, :3].tolist() == pytest.approx([0.0, 1.0, 0.0])
    assert stats["corrected_sum"] == 2
    assert importance_weights(train, sampler, mask, "none")[0] is None
    # the weights multiply each token's loss
    logp_old, advantages = torch.zeros(1, 4, dtype=F64), torch.ones(1, 4, dtype=F64)
    weights, _ = importance_weights(train, sampler, mask, "tis", 2.0)
    loss, _ = ppo_policy_loss(logp_old.clone(), logp_old, advantages, mask, weights=weights)
    assert loss.item() == pytest.approx(-(0.25 + 1.0 + 2.0))


def test_kl_estimators_by_hand():
    """d = logp_old - logp_ref = 0.5: k1 0.5, k2 0.125, k3 exp(-0.5) - 1 + 0.5 = 0.1065307;
    d = -0.5: k1 -0.5 (k1 alone can be negative), k2 0.125, k3 exp(0.5) - 1 - 0.5."""
    from megatron_dvpo.rl.advantages import kl_penalty

    old = torch.tensor([[0.0, 0.0, 3.0]], dtype=F64)
    ref = torch.tensor([[-0.5, 0.5, -9.0]], dtype=F64)
    mask = torch.tensor([[True, True, False]])
    assert kl_penalty(old, ref, mask, "k1").tolist() == [[0.5, -0.5, 0.0]]
    assert kl_penalty(old, ref, mask, "k2").tolist() == [[0.125, 0.125, 0.0]]
    assert kl_penalty(old, ref, mask, "k3")[0].tolist() == pytest.approx(
        [math.exp(-0.5) - 0.5, math.exp(0.5) - 1.5, 0.0])


def test_dpo_label_smoothing_and_ipo_by_hand():
    """One pair with h = (c - c_ref) - (r - r_ref) = 2 and beta 0.5 (margin 1): DPO log(1 +
    e^-1); conservative DPO at 0.1: 0.9 log(1 + e^-1) + 0.1 log(1 + e^1); IPO (h - 1/(2 beta))^2
    = (2 - 1)^2 = 1."""
    from megatron_dvpo.rl.losses import dpo_loss

    c, r, zero = torch.tensor([2.0]), torch.tensor([0.0]), torch.zeros(1)
    plain = math.log(1 + math.exp(-1))
    assert dpo_loss(c, r, zero, zero, 0.5)[0].item() == pytest.approx(plain)
    assert dpo_loss(c, r, zero, zero, 0.5, label_smoothing=0.1)[0].item() == pytest.approx(
        0.9 * plain + 0.1 * math.log(1 + math.e))
    assert dpo_loss(c, r, zero, zero, 0.5, "ipo")[0].item() == pytest.approx(1.0)


def test_gspo_clips_whole_responses_by_their_sequence_ratio():
    """policy_batch, eps 0.2: row 0's sequence ratio is sqrt(1.5 * 0.9) = 1.1619 (inside the
    clip), row 1's sqrt(0.5 * 0.5) = 0.5 (clipped at 0.8 where A = -1 wins the min, unclipped
    at 0.5 where A = +1). Per token: row 0 -1.1619 * 1, -1.1619 * -2; row 1: 0.8, -0.5. Every
    unclipped token's gradient is -s * A (the sequence ratio, not its own)."""
    logp, logp_old, advantages = policy_batch()
    s0 = math.sqrt(1.35)
    loss, stats = gspo_policy_loss(logp, logp_old, advantages, MASK)
    assert loss.item() == pytest.approx(-s0 + 2 * s0 + 0.8 - 0.5)
    assert stats["clipfrac_sum"].item() == 1 and stats["ratio_sum"].item() == \
        pytest.approx(2 * s0 + 1.0)
    loss.backward()
    assert logp.grad.flatten().tolist() == pytest.approx([-s0, 2 * s0, 0.0, 0.0, -0.5, 0.0])


def test_every_registry_matches_its_config_key():
    """A registry and the Literal of the config key that selects from it name the same
    options, so a config value is never accepted and then unknown (or the reverse)."""
    from typing import get_args, get_type_hints

    from megatron_dvpo.config import DPOConfig, GRPOConfig, PPOConfig, RLConfig
    from megatron_dvpo.rl.advantages import KL_ESTIMATORS
    from megatron_dvpo.rl.losses import DPO_LOSSES, VALUE_LOSSES
    from megatron_dvpo.rl.policy_loss import AGGREGATIONS, IS_CORRECTIONS, POLICY_LOSSES

    def options(cls, key):
        return set(get_args(get_type_hints(cls)[key]))

    assert options(RLConfig, "policy_loss") == set(POLICY_LOSSES)
    assert options(RLConfig, "loss_agg_mode") == set(AGGREGATIONS)
    assert options(RLConfig, "kl_estimator") == set(KL_ESTIMATORS)
    assert options(RLConfig, "is_correction") == set(IS_CORRECTIONS)
    assert options(PPOConfig, "value_loss") == set(VALUE_LOSSES)
    assert options(DPOConfig, "loss") == set(DPO_LOSSES)
    assert options(GRPOConfig, "estimator") <= set(__import__(
        "megatron_dvpo.rl.estimators", fromlist=["ESTIMATORS"]).ESTIMATORS)
