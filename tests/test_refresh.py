"""The GVM refresh's pure parts: on-policy pairs ranked by a scorer, and the pairwise term's
treatment of a tied pair (the DVPO runs with refresh are in test_dvpo.py)."""

from __future__ import annotations

import torch

from megatron_dvpo.config import GVMConfig
from megatron_dvpo.data.dataset import collate
from megatron_dvpo.gvm.objectives import OBJECTIVES
from megatron_dvpo.models.generation import Rollout
from megatron_dvpo.rl.refresh import ranked_pairs
from megatron_dvpo.rl.rewards import RolloutTextScores


def rollout(responses: list[list[int]], width: int = 4) -> Rollout:
    tokens = torch.zeros(len(responses), 2 + width, dtype=torch.int64)
    mask = torch.zeros(len(responses), width, dtype=torch.bool)
    for i, r in enumerate(responses):
        tokens[i, 2:2 + len(r)] = torch.tensor(r)
        mask[i, :len(r)] = True
    return Rollout(tokens, torch.zeros(len(responses), dtype=torch.int64), 2, mask,
                   torch.zeros(mask.shape))


def test_pairs_are_ranked_by_the_scorer_and_ties_sit_at_the_midpoint():
    prompts = [[1, 5], [1, 6], [1, 7]]
    first = rollout([[10, 2], [11, 12, 2], [13]])
    second = rollout([[20, 21, 2], [22], [23, 2]])
    samples, ties = ranked_pairs(prompts, first, second, [0.1, 0.9, 0.5], [0.7, 0.2, 0.5],
                                 (1.0, -1.0))
    assert ties == 1
    assert [(s.prompt_ids, s.response_ids, s.reward) for s in samples] == [
        ([1, 5], [20, 21, 2], 1.0), ([1, 5], [10, 2], -1.0),  # the second sample won
        ([1, 6], [11, 12, 2], 1.0), ([1, 6], [22], -1.0),
        ([1, 7], [13], 0.0), ([1, 7], [23, 2], 0.0)]  # a tie: both at the midpoint


def test_a_tied_pair_adds_nothing_to_the_pairwise_term():
    """td_pairwise on [ordered pair, tied pair]: the Bradley-Terry part counts one pair, and
    its gradient reaches only the ordered pair's final values."""
    samples, _ = ranked_pairs([[1, 5], [1, 6]], rollout([[10, 2], [11, 2]]),
                              rollout([[12, 2], [13, 2]]), [1.0, 0.3], [0.0, 0.3], (1.0, -1.0))
    batch = collate(samples, 6, 0)
    objective = OBJECTIVES["td_pairwise"](GVMConfig(objective="td_pairwise", pairwise_weight=2.0))
    assert objective.loss.counts(batch)["pairs"] == 1.0
    values = torch.zeros(4, 6, requires_grad=True)
    terms, stats = objective.loss.terms({"values": values}, batch)
    assert float(stats["correct"]) == 0.5  # equal values: a tie counts half
    td_only = OBJECTIVES["td"](GVMConfig())
    td_terms, _ = td_only.loss.terms({"values": values}, batch)
    assert torch.equal(terms["td"], td_terms["td"])
    terms["pairs"].backward()  # the pairwise part alone
    grad = values.grad
    last = 3  # prompt 2 + response 2, q-view: the last response token's output
    assert grad[0, last] < 0 < grad[1, last]  # chosen up, rejected down
    assert grad[2:].abs().sum() == 0  # the tied pair: no pairwise gradient
    # weight 2 x -log sigmoid(0) / 1 pair
    assert torch.isclose(terms["pairs"], 2 * torch.log(torch.tensor(2.0)))


class _Tokenizer:
    eos_id = 2

    @staticmethod
    def decode(ids: list[int]) -> str:
        return " ".join(map(str, ids))


def test_a_step_scores_each_rollout_once():
    """The refresh ranks the step's rollout and its second sample; the true reward then reads
    the step's rollout again: the user's scorer sees each response once."""
    calls = []

    def scorer(prompt: str, response: str) -> float:
        calls.append(response)
        return float(len(response))

    scores = RolloutTextScores(scorer, _Tokenizer())
    prompts = [[1, 5], [1, 6]]
    step, second = rollout([[10, 2], [11, 12, 2]]), rollout([[20, 2], [21, 2]])
    first = scores(prompts, step)  # the refresh: the step's rollout, then its second sample
    assert scores(prompts, second) == [2.0, 2.0]
    assert scores(prompts, step) == first == [2.0, 5.0]  # the true reward
    assert calls == ["10", "11 12", "20", "21"]
    scores(prompts, rollout([[10, 2], [11, 12, 2]]))  # another step's rollout, equal tokens
    assert len(calls) == 6
