"""DVPO advantage estimators, whitening and KL controllers against hand-computed numbers."""

from __future__ import annotations

import pytest
import torch

from megatron_dvpo.rl.advantages import (AdaptiveKLController, FixedKLController,
                                           compute_advantages, gae, gae_advantages, kl_penalty,
                                           masked_moments, q_advantages, td_advantages, whiten,
                                           whiten_with_moments)

F64 = torch.float64
Q3 = [0.2, 0.5, -0.1]
# Rollout and reference log-probs of the 3-token row: logp_old - logp_ref = [0.5, -1.0, 0.0],
# so with beta = 0.1 the KL shaping -beta * kl is [-0.05, 0.1, 0.0].
LOGP_OLD = [-1.0, -2.0, -0.5]
LOGP_REF = [-1.5, -1.0, -0.5]
# sqrt(1.5): the whitened magnitude of three values spaced 0.3 apart (see the gae tests).
S = 1.224744871391589


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


def full_mask(rows: int, steps: int) -> torch.Tensor:
    return torch.ones(rows, steps, dtype=torch.bool)


def padded_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row 0 is Q3 after q_prompt 0.1; row 1 is q = [0.4, -0.3] after q_prompt -0.2, with junk
    (9.0) in its padded slot."""
    q = t([Q3, [0.4, -0.3, 9.0]])
    q_prompt = torch.tensor([0.1, -0.2], dtype=F64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    return q, q_prompt, mask


# --- kl_penalty, td, q -------------------------------------------------------------------------

def test_kl_penalty_is_logp_difference_zero_at_padding():
    logp_old = t([LOGP_OLD, [-0.2, -3.0, 50.0]])
    logp_ref = t([LOGP_REF, [-0.7, -2.5, -50.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    kl = kl_penalty(logp_old, logp_ref, mask)
    assert kl[0].tolist() == pytest.approx([0.5, -1.0, 0.0])
    assert kl[1].tolist() == pytest.approx([0.5, -0.5, 0.0])


def test_td_three_tokens_by_hand():
    # A = [0.2 - 0.0, 0.5 - 0.2, -0.1 - 0.5] = [0.2, 0.3, -0.6]
    a = td_advantages(t([Q3]), torch.tensor([0.0], dtype=F64), full_mask(1, 3))
    assert a[0].tolist() == pytest.approx([0.2, 0.3, -0.6])
    # Telescoping: the row sums to q_{T-1} - q_{-1} = -0.1 - 0.0.
    assert a.sum().item() == pytest.approx(-0.1)


def test_td_padded_batch_by_hand():
    q, q_prompt, mask = padded_batch()
    a = td_advantages(q, q_prompt, mask)
    # Row 0: [0.2 - 0.1, 0.5 - 0.2, -0.1 - 0.5] = [0.1, 0.3, -0.6]
    # Row 1: [0.4 + 0.2, -0.3 - 0.4, pad]        = [0.6, -0.7, 0.0]
    assert a[0].tolist() == pytest.approx([0.1, 0.3, -0.6])
    assert a[1].tolist() == pytest.approx([0.6, -0.7, 0.0])
    assert a[1, 2].item() == 0.0  # junk q there never leaks
    # Telescoping per row: q_{T-1} - q_{-1} = -0.1 - 0.1 and -0.3 + 0.2.
    assert a.sum(1).tolist() == pytest.approx([-0.2, -0.1])


def test_td_telescopes_on_random_rows():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([1, 5, 3, 7])
    q = torch.randn(4, 7, generator=gen, dtype=F64)
    q_prompt = torch.randn(4, generator=gen, dtype=F64)
    mask = torch.arange(7).unsqueeze(0) < lengths.unsqueeze(1)
    a = td_advantages(q, q_prompt, mask)
    last = q.gather(1, (lengths - 1).unsqueeze(1)).squeeze(1)
    assert a.sum(1).tolist() == pytest.approx((last - q_prompt).tolist(), abs=1e-12)
    assert a[~mask].eq(0).all()


def test_q_estimator_is_q_zero_at_padding():
    q, _, mask = padded_batch()
    assert q_advantages(q, mask).tolist() == [[0.2, 0.5, -0.1], [0.4, -0.3, 0.0]]


@pytest.mark.parametrize("estimator, expected", [
    # td: [0.2, 0.3, -0.6] + [-0.05, 0.1, 0.0]
    ("td", [0.15, 0.4, -0.6]),
    # q:  [0.2, 0.5, -0.1] + [-0.05, 0.1, 0.0]
    ("q", [0.15, 0.6, -0.1]),
])
def test_kl_shaping_by_hand(estimator, expected):
    q, q_prompt, mask = t([Q3]), torch.tensor([0.0], dtype=F64), full_mask(1, 3)
    a, stats = compute_advantages(estimator, q, q_prompt, mask, logp_old=t([LOGP_OLD]),
                                  logp_ref=t([LOGP_REF]), beta=0.1)
    assert a[0].tolist() == pytest.approx(expected)
    assert stats["tokens"].item() == 3 and stats["rows"].item() == 1
    assert stats["kl_sum"].item() == pytest.approx(-0.5)
    assert stats["kl_mean"].item() == pytest.approx(-0.5 / 3)
    assert stats["adv_sum"].item() == pytest.approx(sum(expected))
    assert stats["adv_sq_sum"].item() == pytest.approx(sum(x * x for x in expected))
    assert stats["final_value_sum"].item() == pytest.approx(-0.1)
    assert all(not v.requires_grad for v in stats.values())


@pytest.mark.parametrize("kwargs", [
    {"logp_old": t([LOGP_OLD]), "logp_ref": t([LOGP_REF]), "beta": 0.0},
    {"logp_old": t([LOGP_OLD]), "beta": 0.1},  # no reference model loaded
])
def test_no_shaping_without_beta_or_reference(kwargs):
    a, stats = compute_advantages("td", t([Q3]), torch.tensor([0.0], dtype=F64), full_mask(1, 3),
                                  **kwargs)
    assert a[0].tolist() == pytest.approx([0.2, 0.3, -0.6])
    assert ("kl_mean" in stats) == ("logp_ref" in kwargs)


def test_advantages_are_detached_and_at_least_float32():
    q = torch.tensor([Q3], dtype=torch.bfloat16, requires_grad=True)
    a = td_advantages(q, torch.zeros(1, dtype=torch.bfloat16), full_mask(1, 3))
    assert a.dtype == torch.float32 and not a.requires_grad


# --- gae -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("gamma, lam, expected_adv", [
    # V = [0.5, 0.2, -0.4], r = [0, 0, 1], V(s_3) = 0.
    # gamma = 1: delta = [0 + 0.2 - 0.5, 0 - 0.4 - 0.2, 1 + 0 + 0.4] = [-0.3, -0.6, 1.4]
    # A_2 = 1.4; A_1 = -0.6 + 0.95 * 1.4 = 0.73; A_0 = -0.3 + 0.95 * 0.73 = 0.3935
    (1.0, 0.95, [0.3935, 0.73, 1.4]),
    # gamma = 0.9: delta = [0.18 - 0.5, -0.36 - 0.2, 1.4] = [-0.32, -0.56, 1.4]; gamma*lam = 0.45
    # A_2 = 1.4; A_1 = -0.56 + 0.63 = 0.07; A_0 = -0.32 + 0.45 * 0.07 = -0.2885
    (0.9, 0.5, [-0.2885, 0.07, 1.4]),
    # lam = 0: A = delta (one-step TD errors).
    (1.0, 0.0, [-0.3, -0.6, 1.4]),
])
def test_gae_by_hand(gamma, lam, expected_adv):
    values = t([[0.5, 0.2, -0.4]])
    adv, ret = gae(values, t([[0.0, 0.0, 1.0]]), full_mask(1, 3), gamma, lam)
    assert adv[0].tolist() == pytest.approx(expected_adv)
    # returns = A + V
    assert ret[0].tolist() == pytest.approx([a + v for a, v in zip(expected_adv, [0.5, 0.2, -0.4])])


def test_gae_gamma_lam_one_returns_reward_to_go():
    # r = [0.1, -0.2, 1.0]: reward-to-go [0.9, 0.8, 1.0] whatever the values;
    # A = returns - V = [0.9 - 0.5, 0.8 - 0.2, 1.0 + 0.4] = [0.4, 0.6, 1.4].
    adv, ret = gae(t([[0.5, 0.2, -0.4]]), t([[0.1, -0.2, 1.0]]), full_mask(1, 3), 1.0, 1.0)
    assert ret[0].tolist() == pytest.approx([0.9, 0.8, 1.0])
    assert adv[0].tolist() == pytest.approx([0.4, 0.6, 1.4])


def test_gae_padded_row_bootstraps_zero_after_last_token():
    # Row 1 has 2 tokens and junk (99, 77) in its padded slot:
    # delta_1 = 0.5 + 0 + 0.1 = 0.6; delta_0 = 0.2 - 0.1 - 0.3 = -0.2
    # A_1 = 0.6; A_0 = -0.2 + 0.95 * 0.6 = 0.37; returns [0.37 + 0.3, 0.6 - 0.1] = [0.67, 0.5]
    values = t([[0.5, 0.2, -0.4], [0.3, -0.1, 99.0]])
    rewards = t([[0.0, 0.0, 1.0], [0.2, 0.5, 77.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv, ret = gae(values, rewards, mask, 1.0, 0.95)
    assert adv[0].tolist() == pytest.approx([0.3935, 0.73, 1.4])
    assert adv[1].tolist() == pytest.approx([0.37, 0.6, 0.0])
    assert ret[1].tolist() == pytest.approx([0.67, 0.5, 0.0])


def dvpo_row_inputs() -> tuple[torch.Tensor, ...]:
    """q = Q3 after q_prompt -0.1, so V(s_t) = q_{t-1} = [-0.1, 0.2, 0.5] (q_2 is never a value)."""
    return t([Q3]), torch.tensor([-0.1], dtype=F64), full_mask(1, 3)


def test_dvpo_gae_released_behaviour_by_hand():
    # Per-sequence whitening of V = [-0.1, 0.2, 0.5]: mean 0.2, deviations [-0.3, 0, 0.3],
    # population var (0.09 + 0 + 0.09) / 3 = 0.06, std = sqrt(0.06) = 0.2449..., so the
    # whitened values are [-s, 0, s] with s = 0.3 / sqrt(0.06) = sqrt(1.5) = 1.2247449.
    # KL-only rewards with beta = 0.1: r = [-0.05, 0.1, 0.0]; gamma = 1, lam = 0.95:
    # delta_0 = -0.05 + 0 + s = s - 0.05
    # delta_1 =  0.1  + s - 0 = s + 0.1
    # delta_2 =  0.0  + 0 - s = -s                          -> A_2 = -s         = -1.2247449
    # A_1 = s + 0.1 - 0.95 s = 0.1 + 0.05 s                                     =  0.1612372
    # A_0 = s - 0.05 + 0.95 (0.1 + 0.05 s) = 1.0475 s + 0.045                   =  1.3279203
    # returns = A + V = [0.045 + 0.0475 s, 0.1 + 0.05 s, 0] = [0.1031754, 0.1612372, 0.0]
    q, q_prompt, mask = dvpo_row_inputs()
    rewards = -0.1 * (t([LOGP_OLD]) - t([LOGP_REF]))
    adv, ret = gae_advantages(q, q_prompt, mask, rewards, 1.0, 0.95)
    assert adv[0].tolist() == pytest.approx([1.3279203, 0.1612372, -S], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([0.1031754, 0.1612372, 0.0], abs=1e-6)

    # The dispatcher builds the same KL rewards itself.
    via_dispatch, stats = compute_advantages("gae", q, q_prompt, mask, logp_old=t([LOGP_OLD]),
                                             logp_ref=t([LOGP_REF]), beta=0.1, gamma=1.0,
                                             lam=0.95)
    assert torch.allclose(via_dispatch, adv)
    assert stats["kl_sum"].item() == pytest.approx(-0.5)


def test_dvpo_gae_without_whitening_by_hand():
    # V = [-0.1, 0.2, 0.5] as is, r = [-0.05, 0.1, 0.0]:
    # delta = [-0.05 + 0.2 + 0.1, 0.1 + 0.5 - 0.2, 0 - 0.5] = [0.25, 0.4, -0.5]
    # A_2 = -0.5; A_1 = 0.4 - 0.475 = -0.075; A_0 = 0.25 + 0.95 * -0.075 = 0.17875
    q, q_prompt, mask = dvpo_row_inputs()
    rewards = t([[-0.05, 0.1, 0.0]])
    adv, ret = gae_advantages(q, q_prompt, mask, rewards, 1.0, 0.95, whiten_values=False)
    assert adv[0].tolist() == pytest.approx([0.17875, -0.075, -0.5])
    assert ret[0].tolist() == pytest.approx([0.07875, 0.125, 0.0])


def test_dvpo_gae_without_reference_has_zero_rewards():
    # r = 0, whitened V = [-s, 0, s]: delta = [s, s, -s];
    # A_2 = -s; A_1 = s - 0.95 s = 0.05 s; A_0 = s + 0.95 * 0.05 s = 1.0475 s
    q, q_prompt, mask = dvpo_row_inputs()
    for kwargs in ({}, {"logp_old": t([LOGP_OLD]), "logp_ref": t([LOGP_REF]), "beta": 0.0}):
        adv, _ = compute_advantages("gae", q, q_prompt, mask, **kwargs)
        assert adv[0].tolist() == pytest.approx([1.0475 * S, 0.05 * S, -S], abs=1e-6)


def test_dvpo_gae_whitens_each_sequence_on_its_own():
    # Row 1 (2 tokens, junk past them): V = [q_-1, q_0] = [0.0, 0.4] -> mean 0.2, std 0.2,
    # whitened [-1, 1]. Zero rewards: delta = [0 + 1 + 1, 0 + 0 - 1] = [2, -1];
    # A_1 = -1; A_0 = 2 - 0.95 = 1.05. Row 0 is unchanged by row 1's presence.
    q = t([Q3, [0.4, 9.0, 9.0]])
    q_prompt = torch.tensor([-0.1, 0.0], dtype=F64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv, ret = gae_advantages(q, q_prompt, mask, torch.zeros(2, 3, dtype=F64), 1.0, 0.95)
    assert adv[0].tolist() == pytest.approx([1.0475 * S, 0.05 * S, -S], abs=1e-6)
    assert adv[1].tolist() == pytest.approx([1.05, -1.0, 0.0], abs=1e-6)
    assert ret[1].tolist() == pytest.approx([0.05, 0.0, 0.0], abs=1e-6)


def test_dvpo_gae_lambda_decides_whether_the_action_counts():
    """docs/algorithm.md, "Which estimator": with zero rewards and V(s_T) = 0, lambda 1 gives
    A_t = -V(s_t), blind to y_t's own value q_t; lambda 0 gives the td advantage q_t - q_{t-1}
    for every token but the last, which gets -V(s_{T-1}) and never reads q_{T-1}."""
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([4, 6, 2])
    q = torch.randn(3, 6, generator=gen, dtype=F64)
    q_prompt = torch.randn(3, generator=gen, dtype=F64)
    mask = torch.arange(6).unsqueeze(0) < lengths.unsqueeze(1)
    zeros = torch.zeros(3, 6, dtype=F64)
    states = torch.cat([q_prompt[:, None], q[:, :-1]], 1)  # V(s_t) = q_{t-1}
    blind, _ = gae_advantages(q, q_prompt, mask, zeros, 1.0, 1.0, whiten_values=False)
    assert torch.allclose(blind, torch.where(mask, -states, 0.0), atol=1e-12)
    one_step, _ = gae_advantages(q, q_prompt, mask, zeros, 1.0, 0.0, whiten_values=False)
    td = td_advantages(q, q_prompt, mask)
    last = (lengths - 1).unsqueeze(1)
    not_last = mask & (torch.arange(6).unsqueeze(0) < last)
    assert torch.allclose(one_step[not_last], td[not_last], atol=1e-12)
    assert torch.allclose(one_step.gather(1, last), -states.gather(1, last), atol=1e-12)
    q_eos = q.clone().scatter_(1, last, 100.0)  # the value at EOS: lambda 0 never reads it
    assert torch.equal(gae_advantages(q_eos, q_prompt, mask, zeros, 1.0, 0.0,
                                      whiten_values=False)[0], one_step)


def test_dvpo_gae_single_token_row():
    # One value, V = [q_-1]: std 0, so it whitens to exactly 0 (the epsilon avoids 0/0);
    # A_0 = r_0 + 0 - 0.
    adv, ret = gae_advantages(t([[0.7]]), torch.tensor([0.3], dtype=F64), full_mask(1, 1),
                              t([[-0.25]]), 1.0, 0.95)
    assert adv.tolist() == [[-0.25]] and ret.tolist() == [[-0.25]]


# --- whitening -----------------------------------------------------------------------------------

def whiten_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Valid entries 1, 2, 3, 4 (junk 100 in the padding): mean 2.5, population variance
    (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25, std sqrt(1.25) = 1.1180340."""
    x = t([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    return x, mask


def test_whiten_by_hand():
    x, mask = whiten_batch()
    w = whiten(x, mask)
    # +-1.5 / 1.1180340 = +-1.3416408, +-0.5 / 1.1180340 = +-0.4472136
    assert w[0].tolist() == pytest.approx([-1.3416408, -0.4472136, 0.4472136], abs=1e-6)
    assert w[1].tolist() == pytest.approx([1.3416408, 0.0, 0.0], abs=1e-6)
    assert w[1, 1:].eq(0).all()
    valid = w[mask]
    assert valid.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert valid.std(correction=0).item() == pytest.approx(1.0, abs=1e-6)


def test_whiten_without_shift_keeps_the_mean():
    x, mask = whiten_batch()
    w = whiten(x, mask, shift_mean=False)
    assert w[0].tolist() == pytest.approx([1.1583592, 2.0527864, 2.9472136], abs=1e-6)
    assert w[1].tolist() == pytest.approx([3.8416408, 0.0, 0.0], abs=1e-6)


def test_moments_by_hand_and_summed_over_ranks_match_direct_whitening():
    x, mask = whiten_batch()
    total, total_sq, count = masked_moments(x, mask)
    assert (total.item(), total_sq.item(), count.item()) == (10.0, 30.0, 4.0)
    # Two "ranks" hold one row each; adding their moments is what an all-reduce does.
    parts = [masked_moments(x[i:i + 1], mask[i:i + 1]) for i in range(2)]
    summed = [sum(p[k] for p in parts) for k in range(3)]
    direct = whiten(x, mask)
    for i in range(2):
        assert torch.allclose(whiten_with_moments(x[i:i + 1], mask[i:i + 1], *summed),
                              direct[i:i + 1], atol=1e-12)


def test_whiten_constant_batch_is_zero_and_dtype_kept():
    x = torch.full((2, 2), 3.0)
    w = whiten(x, full_mask(2, 2))
    assert w.dtype == torch.float32 and w.eq(0).all()


def test_whiten_without_valid_entries_raises():
    with pytest.raises(ValueError, match="without valid entries"):
        whiten(torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.bool))


# --- KL controllers ------------------------------------------------------------------------------

def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(init_beta=0.2, target=6.0, horizon=10000)
    # KL 9 is 50% over target: error clipped to 0.2; factor 1 + 0.2 * 1000 / 10000 = 1.02.
    ctl.update(9.0, 1000)
    assert ctl.beta == pytest.approx(0.204)
    # KL 5.4 is 10% under: factor 1 - 0.1 * 500 / 10000 = 0.995; 0.204 * 0.995 = 0.20298.
    ctl.update(5.4, 500)
    assert ctl.beta == pytest.approx(0.20298)
    # KL 0 (or a negative sample estimate) clips to -0.2: factor 1 - 0.2 * 0.1 = 0.98.
    ctl.update(-1.0, 1000)
    assert ctl.beta == pytest.approx(0.20298 * 0.98)


def test_kl_controller_state_round_trip():
    ctl = AdaptiveKLController(0.2, 6.0, 10000)
    ctl.update(9.0, 1000)
    resumed = AdaptiveKLController(0.2, 6.0, 10000)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.beta == ctl.beta == pytest.approx(0.204)
    with pytest.raises(KeyError, match="needs 'beta'"):
        resumed.load_state_dict({})


def test_fixed_kl_controller_never_moves():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 10**6)
    ctl.load_state_dict({"beta": 0.9})
    assert ctl.beta == 0.05 and ctl.state_dict() == {"beta": 0.05}


@pytest.mark.parametrize("args, update, match", [
    ((-0.1, 6.0, 10000), None, "init_beta must be >= 0"),
    ((0.2, 0.0, 10000), None, "target KL must be > 0"),
    ((0.2, 6.0, 0), None, "horizon must be > 0"),
    ((0.2, 6.0, 10000), (float("nan"), 10), "current_kl must be finite"),
    ((0.2, 6.0, 10000), (1.0, -1), "n_steps must be >= 0"),
    ((0.2, 6.0, 10), (0.0, 60), "would make beta negative"),
])
def test_kl_controller_invalid_inputs_raise(args, update, match):
    with pytest.raises(ValueError, match=match):
        ctl = AdaptiveKLController(*args)
        ctl.update(*update)


# --- errors --------------------------------------------------------------------------------------

def test_unknown_estimator_lists_the_three():
    with pytest.raises(ValueError, match="unknown estimator 'ppo'; choose one of td, q, gae"):
        compute_advantages("ppo", t([Q3]), torch.zeros(1, dtype=F64), full_mask(1, 3))


@pytest.mark.parametrize("call, match", [
    (lambda: td_advantages(t([Q3]), torch.zeros(1), torch.tensor([[True, False, True]])),
     "non-empty prefix"),
    (lambda: td_advantages(t([Q3]), torch.zeros(1), torch.zeros(1, 3, dtype=torch.bool)),
     "non-empty prefix"),
    (lambda: td_advantages(t([Q3]), torch.zeros(2), full_mask(1, 3)), r"q_prompt must have shape"),
    (lambda: q_advantages(t([Q3]), torch.ones(1, 3)), "mask must be a 2-D bool tensor"),
    (lambda: q_advantages(t([Q3]), full_mask(1, 2)), "must have the same shape"),
    (lambda: gae(t([Q3]), t([Q3]), full_mask(1, 3), 1.0, 1.5), "lam must be in"),
    (lambda: gae(t([Q3]), t([Q3]), full_mask(1, 3), -0.1, 0.9), "gamma must be in"),
    (lambda: compute_advantages("td", t([Q3]), torch.zeros(1), full_mask(1, 3), beta=-0.1),
     "beta must be >= 0"),
    (lambda: compute_advantages("td", t([Q3]), torch.zeros(1), full_mask(1, 3),
                                logp_ref=t([LOGP_REF]), beta=0.1), "logp_ref needs logp_old"),
])
def test_invalid_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_gae_with_released_value_whitening_matches_the_released_recipe():
    """Raw GVM outputs of each forward chunk (prompt positions, padding and the last position
    included) whitened with TRL's whiten (unbiased variance, rsqrt(var + 1e-8)), the last column
    dropped, V(s_t) read at the position before y_t, then GAE over the KL-only rewards."""
    from megatron_dvpo.rl.scoring import (reads_released_whitening, released_whitened_q_view,
                                          rollout_q_view)

    g = torch.Generator().manual_seed(3)
    width, lengths = 3, torch.tensor([4, 2, 3, 1])
    raw = torch.randn(4, width + 4, generator=g, dtype=F64) * 2 + 0.7
    mask = torch.arange(4)[None, :] < lengths[:, None]
    logp_old = torch.randn(4, 4, generator=g, dtype=F64)
    logp_ref = torch.randn(4, 4, generator=g, dtype=F64)
    beta, gamma, lam, chunk = 0.1, 0.9, 0.8, 2
    expected = torch.zeros(4, 4, dtype=F64)
    for start in range(0, 4, chunk):
        block = raw[start:start + chunk]
        white = ((block - block.mean()) * torch.rsqrt(block.var(unbiased=True) + 1e-8))[:, :-1]
        for b in range(block.shape[0]):
            row, n = start + b, int(lengths[start + b])
            v = [white[b, width - 1 + i].item() for i in range(n)] + [0.0]
            r = [-beta * (logp_old[row, i] - logp_ref[row, i]).item() for i in range(n)]
            running = 0.0
            for i in reversed(range(n)):
                running = r[i] + gamma * v[i + 1] - v[i] + gamma * lam * running
                expected[row, i] = running
    assert reads_released_whitening("gae", "released")
    q, q_prompt = released_whitened_q_view(raw, width, lengths, "qview", chunk)
    got, _ = compute_advantages("gae", q, q_prompt, mask, logp_old, logp_ref, beta, gamma, lam,
                                whiten_values=False)
    assert torch.allclose(got, expected, atol=1e-12), (got, expected)
    # the per-sequence variant is a different estimator, and says so by its name
    assert not reads_released_whitening("gae", "per_sequence_states")
    q, q_prompt = rollout_q_view(raw, width, lengths, "qview")
    other, _ = compute_advantages("gae", q, q_prompt, mask, logp_old, logp_ref, beta, gamma,
                                  lam, whiten_values=True)
    assert not torch.allclose(other, expected, atol=1e-3)


def test_length_rewards_cost_every_token_and_a_cut_response_more():
    from megatron_dvpo.rl.advantages import length_rewards

    mask = torch.tensor([[True, True, True], [True, True, False]])
    ended = torch.tensor([[False, False, False], [False, True, False]])  # row 1 ends in EOS
    got = length_rewards(mask, ended, torch.tensor([True, False]), per_token=0.1, truncation=1.0)
    assert torch.allclose(got, torch.tensor([[-0.1, -0.1, -1.1], [-0.1, 0.0, 0.0]]))


@pytest.mark.parametrize("estimator", ["td", "q", "gae", "gae_critic", "grpo"])
def test_every_estimator_takes_the_length_rewards_as_it_takes_the_kl_penalty(estimator):
    """With lambda 0 and gamma 1 a per-token reward moves each token's advantage by itself
    (DVPO's td, q and gae, PPO's gae over a critic); GRPO's sequence reward by its sum."""
    from megatron_dvpo.rl.estimators import (ESTIMATORS, CriticScores, EstimatorInputs,
                                             GVMScores)

    mask = torch.tensor([[True, True, True], [True, True, False]])
    extra = torch.tensor([[-0.1, -0.1, -1.1], [-0.1, -0.1, 0.0]], dtype=F64)
    q = t([Q3, [0.3, -0.2, 0.0]])
    scores = (GVMScores(final_value=q[:, -1], q=q, q_prompt=t([[0.1], [0.0]])[:, 0])
              if estimator in ("td", "q", "gae") else
              CriticScores(final_value=t([[1.0], [-1.0]])[:, 0], rewards=t([[1.0], [-1.0]])[:, 0],
                           state_values=q * mask))
    logp = t([LOGP_OLD, LOGP_OLD])

    def advantages(length):
        x = EstimatorInputs(mask, logp, logp, beta=0.0, gamma=1.0, lam=0.0, group_size=2,
                            length_rewards=length)
        return ESTIMATORS[estimator](scores, x).advantages

    moved = advantages(extra) - advantages(None)
    if estimator == "grpo":  # group-normalised: the shorter, cheaper response gains
        assert moved[1, 0] > 0 > moved[0, 0] and moved[0, 2] == moved[0, 0]
    else:
        assert torch.allclose(moved, extra), moved
