"""GVM TD(lambda) targets and loss against hand-computed numbers."""

from __future__ import annotations

import pytest
import torch

from megatron_dvpo.gvm.td import (gather_response_values, gvm_loss, loss_token_count,
                                  td_lambda_targets)

Q3 = [0.2, 0.5, -0.1]
F64 = torch.float64


def targets(q: list[float], reward: float, gamma: float, lam: float) -> list[float]:
    """Targets of one unpadded row through the library function."""
    qt = torch.tensor([q], dtype=torch.float64)
    g = td_lambda_targets(qt, torch.ones_like(qt, dtype=torch.bool),
                          torch.tensor([reward], dtype=torch.float64), gamma, lam)
    return g[0].tolist()


def one_row(q: list[float], q_prompt: float, prompt_len: int = 2, pad: int = 2) -> torch.Tensor:
    """A [1, S] value row with the given prompt value and response values; other slots are junk."""
    row = [7.0] * (prompt_len - 1) + [q_prompt] + q + [9.0] * pad
    return torch.tensor([row], dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("gamma, lam, expected", [
    # TD(0)/SARSA: G_t = r_t + q_{t+1}.
    (1.0, 0.0, [0.5, -0.1, 1.0]),
    # Monte-Carlo, gamma = 1: every token's target is the final reward.
    (1.0, 1.0, [1.0, 1.0, 1.0]),
    # delta = [0 + 0.5 - 0.2, 0 - 0.1 - 0.5, 1 + 0 + 0.1] = [0.3, -0.6, 1.1]
    # G_2 = -0.1 + 1.1                                  = 1.0
    # G_1 =  0.5 - 0.6 + 0.95 * 1.1 = -0.1 + 1.045      = 0.945
    # G_0 =  0.2 + 0.3 + 0.95 * -0.6 + 0.9025 * 1.1
    #     =  0.5 - 0.57 + 0.99275                       = 0.92275
    # (recursion: G_0 = 0.05 * 0.5 + 0.95 * 0.945 = 0.025 + 0.89775, same)
    (1.0, 0.95, [0.92275, 0.945, 1.0]),
    # gamma = 0.9, Monte-Carlo: G_t = 0.9^(2-t).
    (0.9, 1.0, [0.81, 0.9, 1.0]),
    # gamma = 0.9, TD(0): G_0 = 0.9 * 0.5, G_1 = 0.9 * -0.1, G_2 = 1.
    (0.9, 0.0, [0.45, -0.09, 1.0]),
    # gamma = 0.9, lam = 0.5:
    # G_2 = 1.0
    # G_1 = 0.9 * (0.5 * -0.1 + 0.5 * 1.0)  = 0.9 * 0.45   = 0.405
    # G_0 = 0.9 * (0.5 * 0.5  + 0.5 * 0.405) = 0.9 * 0.4525 = 0.40725
    (0.9, 0.5, [0.40725, 0.405, 1.0]),
])
def test_targets_by_hand(gamma, lam, expected):
    assert targets(Q3, 1.0, gamma, lam) == pytest.approx(expected, abs=1e-6)


def test_single_token_response_target_is_reward():
    assert targets([0.3], -1.0, 0.9, 0.95) == pytest.approx([-1.0])


def test_closed_form_matches_recursion_on_random_rows():
    gen = torch.Generator().manual_seed(0)
    lengths = [1, 4, 7, 2, 5]
    q = torch.randn(len(lengths), 7, generator=gen, dtype=torch.float64)
    rewards = torch.randn(len(lengths), generator=gen, dtype=torch.float64)
    mask = torch.arange(7).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    for gamma, lam in [(1.0, 0.95), (0.9, 0.7), (0.5, 0.0), (0.99, 1.0)]:
        got = td_lambda_targets(q, mask, rewards, gamma, lam)
        for b, n in enumerate(lengths):
            qs = q[b, :n].tolist() + [0.0]  # q_T := 0
            rs = [0.0] * (n - 1) + [rewards[b].item()]
            delta = [rs[t] + gamma * qs[t + 1] - qs[t] for t in range(n)]
            closed = [qs[t] + sum((gamma * lam) ** j * delta[t + j] for j in range(n - t))
                      for t in range(n)]
            assert got[b, :n].tolist() == pytest.approx(closed, abs=1e-12)
            assert got[b, n:].eq(0).all()  # padding untouched, even though q there is junk


def test_gather_two_rows_with_padding():
    # values[b, p] = 10 * b + p, so each gathered number names its position.
    values = (10 * torch.arange(2).unsqueeze(1) + torch.arange(8)).double()
    q, mask, q_prompt = gather_response_values(values, torch.tensor([2, 4]), torch.tensor([3, 2]))
    # Row 0: prompt 0..1, response 2..4; row 1: prompt 0..3, response 4..5, then padding.
    assert q.tolist() == [[2.0, 3.0, 4.0], [14.0, 15.0, 0.0]]
    assert mask.tolist() == [[True, True, True], [True, True, False]]
    assert q_prompt.tolist() == [1.0, 13.0]


def test_batched_targets_ignore_padding_and_match_single_rows():
    # Row 0 is Q3 (P = 2, T = 3); row 1 is a 2-token response after a 4-token prompt.
    # Row 1, lam = 0.95, gamma = 1, q = [0.4, -0.3], r = -1:
    # G_1 = -1;  G_0 = 0.05 * -0.3 + 0.95 * -1 = -0.015 - 0.95 = -0.965
    values = torch.full((2, 8), 5.0, dtype=torch.float64)
    values[0, 2:5] = torch.tensor(Q3, dtype=torch.float64)
    values[1, 4:6] = torch.tensor([0.4, -0.3], dtype=torch.float64)
    q, mask, _ = gather_response_values(values, [2, 4], [3, 2])
    g = td_lambda_targets(q, mask, torch.tensor([1.0, -1.0], dtype=torch.float64), 1.0, 0.95)
    assert g[0].tolist() == pytest.approx([0.92275, 0.945, 1.0], abs=1e-12)
    assert g[1].tolist() == pytest.approx([-0.965, -1.0, 0.0], abs=1e-12)


def test_loss_by_hand():
    # lam = 0, gamma = 1: G = [0.5, -0.1, 1.0]; q - G = [-0.3, 0.6, -1.1];
    # squares 0.09 + 0.36 + 1.21 = 1.66; loss = 0.83.
    values = one_row(Q3, q_prompt=0.4)
    loss, stats = gvm_loss(values, [2], [3], torch.tensor([1.0], dtype=torch.float64), 1.0, 0.0)
    assert loss.item() == pytest.approx(0.83)
    assert stats["tokens"].item() == 3 and stats["response_tokens"].item() == 3
    assert stats["sq_err_sum"].item() == pytest.approx(1.66)
    assert stats["value_sum"].item() == pytest.approx(0.6)
    assert stats["final_value_sum"].item() == pytest.approx(-0.1)
    assert stats["rows"].item() == 1
    assert all(not v.requires_grad for v in stats.values())

    # Prompt value 0.4 toward G_0 = 0.5: one more term, 0.01; loss = 0.5 * 1.67 = 0.835.
    loss, stats = gvm_loss(values, [2], [3], torch.tensor([1.0], dtype=torch.float64), 1.0, 0.0,
                           train_prompt_value=True)
    assert loss.item() == pytest.approx(0.835)
    assert stats["tokens"].item() == 4 and stats["response_tokens"].item() == 3


def test_loss_sums_over_rows():
    # Monte-Carlo, gamma = 1: rows contribute 0.5 * sum (q - r)^2 each.
    # Row 0: (0.2-1)^2 + (0.5-1)^2 + (-0.1-1)^2 = 0.64 + 0.25 + 1.21 = 2.10
    # Row 1: (0.4+1)^2 + (-0.3+1)^2             = 1.96 + 0.49        = 2.45
    values = torch.zeros(2, 8, dtype=torch.float64)
    values[0, 2:5] = torch.tensor(Q3, dtype=torch.float64)
    values[1, 4:6] = torch.tensor([0.4, -0.3], dtype=torch.float64)
    loss, stats = gvm_loss(values, [2, 4], [3, 2], torch.tensor([1.0, -1.0], dtype=torch.float64),
                           1.0, 1.0)
    assert loss.item() == pytest.approx(0.5 * (2.10 + 2.45))
    assert stats["tokens"].item() == 5
    assert stats["final_value_sum"].item() == pytest.approx(-0.1 - 0.3)


@pytest.mark.parametrize("train_prompt_value", [False, True])
def test_gradient_reaches_exactly_the_trained_positions(train_prompt_value):
    values = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    loss, _ = gvm_loss(values, [2, 4], [3, 2], torch.tensor([1.0, -1.0], dtype=torch.float64),
                       1.0, 0.95, train_prompt_value=train_prompt_value)
    loss.backward()
    expected = torch.zeros(2, 8, dtype=torch.bool)
    expected[0, 2:5] = expected[1, 4:6] = True
    if train_prompt_value:
        expected[0, 1] = expected[1, 3] = True
    assert torch.equal(values.grad != 0, expected)


def test_gradient_values_are_prediction_errors():
    # Targets are constants, so d loss / d q_t = q_t - G_t = [-0.3, 0.6, -1.1] (lam = 0), and
    # d loss / d q_-1 = 0.4 - G_0 = -0.1. Row: [prompt junk, q_-1, q_0..q_2, pad, pad].
    values = one_row(Q3, q_prompt=0.4)
    loss, _ = gvm_loss(values, [2], [3], torch.tensor([1.0], dtype=torch.float64), 1.0, 0.0,
                       train_prompt_value=True)
    loss.backward()
    assert values.grad[0].tolist() == pytest.approx([0.0, -0.1, -0.3, 0.6, -1.1, 0.0, 0.0])


def test_targets_carry_no_gradient():
    q = torch.tensor([Q3], dtype=torch.float64, requires_grad=True)
    g = td_lambda_targets(q, torch.ones(1, 3, dtype=torch.bool),
                          torch.tensor([1.0], dtype=torch.float64), 1.0, 0.95)
    assert not g.requires_grad and g.grad_fn is None


def test_bf16_values_get_float32_targets():
    q = torch.tensor([Q3], dtype=torch.bfloat16)
    g = td_lambda_targets(q, torch.ones(1, 3, dtype=torch.bool), torch.tensor([1.0]), 1.0, 1.0)
    assert g.dtype == torch.float32 and g.tolist() == [[1.0, 1.0, 1.0]]


def test_loss_token_count():
    assert loss_token_count([3, 2]) == 5
    assert loss_token_count(torch.tensor([3, 2]), train_prompt_value=True) == 7
    with pytest.raises(ValueError, match="at least one token"):
        loss_token_count([3, 0])


R = torch.tensor([1.0, -1.0])


@pytest.mark.parametrize("prompts, responses, kwargs, error, match", [
    ([2, 4], [3, 0], {}, ValueError, "every response needs at least one token"),
    ([0, 4], [3, 2], {}, ValueError, "at least one token .*q_-1"),
    ([2, 4], [3, 5], {}, ValueError, "exceeds the sequence length 8"),
    ([2, 4], [3, 2], {"lam": 1.5}, ValueError, "lam must be in"),
    ([2, 4], [3, 2], {"gamma": -0.1}, ValueError, "gamma must be in"),
    ([2, 4, 1], [3, 2, 1], {}, ValueError, r"prompt_lengths must have shape \(2,\)"),
    ([2.0, 4.0], [3, 2], {}, TypeError, "prompt_lengths must hold integers"),
])
def test_invalid_inputs_raise(prompts, responses, kwargs, error, match):
    args = {"gamma": 1.0, "lam": 0.95, **kwargs}
    with pytest.raises(error, match=match):
        gvm_loss(torch.zeros(2, 8), prompts, responses, R, **args)


def test_invalid_target_inputs_raise():
    q = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="non-empty prefix"):
        td_lambda_targets(q, torch.tensor([[True, False, True], [True, True, True]]), R, 1.0, 0.9)
    with pytest.raises(ValueError, match="non-empty prefix"):
        td_lambda_targets(q, torch.tensor([[False] * 3, [True] * 3]), R, 1.0, 0.9)
    with pytest.raises(ValueError, match="rewards must have shape"):
        td_lambda_targets(q, torch.ones(2, 3, dtype=torch.bool), torch.ones(3), 1.0, 0.9)
    with pytest.raises(ValueError, match="same shape"):
        td_lambda_targets(q, torch.ones(2, 4, dtype=torch.bool), R, 1.0, 0.9)
    with pytest.raises(ValueError, match="values must be"):
        gvm_loss(torch.zeros(8), [2], [3], R[:1], 1.0, 0.9)


def test_released_alignment_trains_one_position_earlier():
    """``released``: the outputs q_-1 .. q_{T-2} are fitted, the reward on q_{T-2}; the output
    at the last response token gets no gradient."""
    values = one_row(Q3, q_prompt=0.4)  # positions: 7, 0.4 | 0.2, 0.5, -0.1 | 9, 9
    reward = torch.tensor([1.0], dtype=torch.float64)
    loss, stats = gvm_loss(values, [2], [3], reward, 1.0, 0.0, alignment="released")
    trained = [0.4, 0.2, 0.5]  # q_-1, q_0, q_1
    expected = targets(trained, 1.0, 1.0, 0.0)  # TD(0): [0.2, 0.5, 1.0]
    assert expected == pytest.approx([0.2, 0.5, 1.0])
    assert loss.item() == pytest.approx(0.5 * sum((v - g) ** 2 for v, g in zip(trained, expected)))
    assert stats["tokens"].item() == 3 and stats["final_value_sum"].item() == pytest.approx(0.5)
    loss.backward()
    touched = values.grad[0].nonzero().flatten().tolist()
    assert set(touched) <= {1, 2, 3} and 4 not in touched  # q_{T-1} at position 4 is not fitted


def test_released_q_view_reads_the_last_trained_output():
    values = torch.arange(10, dtype=torch.float64).view(1, 10)
    q, mask, q_prompt = gather_response_values(values, [3], [4], alignment="released")
    assert q[0].tolist() == [3.0, 4.0, 5.0, 5.0]  # q_{T-1} := q_{T-2}
    assert q_prompt.item() == 2.0
    q, _, _ = gather_response_values(values, [3], [1], alignment="released")
    assert q[0].tolist() == [2.0]  # one token: the prompt's value is the prediction
    with pytest.raises(ValueError, match="unknown alignment 'shifted'"):
        gather_response_values(values, [3], [4], alignment="shifted")


@pytest.mark.parametrize("alignment", ["qview", "released"])
def test_the_default_objective_trains_every_output_the_estimators_read(alignment):
    """Whatever DVPO's estimators read (q_-1 for td and gae, q_t for all) must be trained by the
    default GVM objective (docs/algorithm.md §1)."""
    from megatron_dvpo.config import GVMConfig

    defaults = GVMConfig(alignment=alignment)
    g = torch.Generator().manual_seed(0)
    values = torch.randn(2, 9, generator=g, dtype=torch.float64, requires_grad=True)
    prompts, responses = [3, 2], [4, 6]
    q, _, q_prompt = gather_response_values(values, prompts, responses, alignment)
    (q.sum() + q_prompt.sum()).backward()
    read = set(map(tuple, values.grad.nonzero().tolist()))
    values.grad = None
    loss, _ = gvm_loss(values, prompts, responses, torch.tensor([1.0, -1.0], dtype=F64),
                       defaults.gamma, defaults.lam, defaults.train_prompt_value,
                       alignment=defaults.alignment)
    loss.backward()
    trained = set(map(tuple, values.grad.nonzero().tolist()))
    assert read <= trained, sorted(read - trained)

