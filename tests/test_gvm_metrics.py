"""Pairwise accuracy of a value model: per-response statistics, ties and the printed table."""

from __future__ import annotations

import pytest
import torch

from megatron_dvpo.gvm.metrics import format_accuracy_table, pairwise_accuracy, response_statistics

KEYS = ["last", "mean", "p1", "p5", "p10", "p90", "p95", "p99"]


def test_statistics_of_a_five_element_row_by_hand():
    # Row [3, -1, 10, 0, 2] sorted: [-1, 0, 2, 3, 10]; quantile p sits at index 4p, interpolated.
    # p1:  4*0.01 = 0.04 -> -1 + 0.04 * (0 - -1)  = -0.96
    # p5:  0.2           -> -1 + 0.2              = -0.8
    # p10: 0.4           -> -1 + 0.4              = -0.6
    # p90: 3.6           ->  3 + 0.6 * (10 - 3)   =  7.2
    # p95: 3.8           ->  3 + 0.8 * 7          =  8.6
    # p99: 3.96          ->  3 + 0.96 * 7         =  9.72
    # mean = 14 / 5 = 2.8; last = 2. Padding (99) must not count.
    q = torch.tensor([[3.0, -1.0, 10.0, 0.0, 2.0, 99.0]])
    mask = torch.tensor([[True] * 5 + [False]])
    stats = response_statistics(q, mask)
    assert list(stats) == KEYS
    expected = [2.0, 2.8, -0.96, -0.8, -0.6, 7.2, 8.6, 9.72]
    assert [stats[k].item() for k in KEYS] == pytest.approx(expected, abs=1e-5)


def test_rows_of_different_lengths():
    q = torch.tensor([[1.0, 2.0, 3.0], [5.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    stats = response_statistics(q, mask)
    assert stats["last"].tolist() == [3.0, 5.0]
    assert stats["mean"].tolist() == [2.0, 5.0]
    for p in ("p1", "p99"):  # a single value is every percentile of its row
        assert stats[p][1].item() == 5.0
    assert all(v.shape == (2,) for v in stats.values())


def test_obvious_pairs_and_ties():
    # Pair 0: chosen better everywhere. Pair 1: rejected better everywhere.
    # Pair 2: same last value (a tie on "last"), chosen better on average.
    mask = torch.ones(3, 3, dtype=torch.bool)
    chosen = torch.tensor([[0.5, 0.8, 0.9], [-0.5, -0.6, -0.9], [0.9, 0.9, 0.1]])
    rejected = torch.tensor([[-0.5, -0.8, -0.9], [0.5, 0.6, 0.9], [-0.9, -0.9, 0.1]])
    acc = pairwise_accuracy(response_statistics(chosen, mask), response_statistics(rejected, mask))
    assert list(acc) == KEYS
    assert acc["last"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert acc["mean"] == pytest.approx(2 / 3)
    assert acc["p90"] == pytest.approx(2 / 3)


def test_constant_model_scores_one_half():
    stats = {"last": torch.zeros(4), "mean": torch.ones(4)}
    assert pairwise_accuracy(stats, stats) == {"last": 0.5, "mean": 0.5}


def test_table():
    table = format_accuracy_table({"last": 0.75, "p99": 0.5}, 8)
    assert table.splitlines() == [
        "pairwise accuracy over 8 pairs",
        "statistic   accuracy",
        "last          75.00%",
        "p99           50.00%",
    ]


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="at least one valid value"):
        response_statistics(torch.zeros(2, 3), torch.tensor([[True] * 3, [False] * 3]))
    with pytest.raises(ValueError, match="same shape"):
        response_statistics(torch.zeros(2, 3), torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="statistics differ"):
        pairwise_accuracy({"last": torch.zeros(2)}, {"mean": torch.zeros(2)})
    with pytest.raises(ValueError, match="statistic 'last'"):
        pairwise_accuracy({"last": torch.zeros(2)}, {"last": torch.zeros(3)})
