"""What a value model learns from a batch of the value dataset (docs/algorithm.md §1, §3):

- ``td``: TD(lambda) token values from each sample's own reward (the GVM of the paper);
- ``td_pairwise``: the same, plus ``gvm.pairwise_weight`` times a Bradley-Terry term on the
  final values of each (chosen, rejected) pair, which learns from the comparison itself instead
  of two +-1 labels that each depend on an unseen partner;
- ``bradley_terry``: Bradley-Terry on the final values alone (PPO's reward model).

An objective is a ``Loss`` (summed terms, each with its count in a microbatch: the update
divides by the global counts once) and the metrics of the whole global batch's summed
statistics and counts. A K-head GVM (``gvm/heads.py``) trains each head on the objective and
minimises their mean; its metrics are the heads' means.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from megatron_dvpo.config import GVMConfig
from megatron_dvpo.device import to_device
from megatron_dvpo.gvm.heads import heads_as_rows, heads_of
from megatron_dvpo.gvm.td import gather_response_values, gvm_loss, loss_token_count
from megatron_dvpo.models import forward
from megatron_dvpo.rl.losses import bradley_terry_loss
from megatron_dvpo.training.loss import Loss
from megatron_dvpo.training.trained_model import TrainedModel, UpdateResult

Counts = dict[str, float]


@dataclass(frozen=True)
class Objective:
    """``loss``: what the model minimises; ``metrics_of(sums, counts)`` of the global batch."""

    loss: Loss
    whole_pairs: bool  # batches hold (chosen, rejected) rows next to each other
    metrics_of: Callable[[dict[str, float], Counts], dict[str, float]]
    summary_tags: tuple[str, ...]

    def metrics(self, update: UpdateResult) -> dict[str, float]:
        head = self.summary_tags[0].split("/")[0]  # gvm or rm
        return {**self.metrics_of(update.sums, update.counts), **update.router_metrics(head)}


TD_SUMS = ("sq_err_sum", "tokens", "response_sq_err_sum", "value_sum", "response_tokens",
           "final_value_sum", "rows")
PAIR_SUMS = ("pair_loss_sum", "correct")


def _ranked(batch: dict) -> torch.Tensor:
    """[pairs] which (chosen, rejected) rows are ordered: a tied pair (a GVM refresh's two
    equally scored samples) teaches values, not an order."""
    rewards = batch["rewards"]
    return rewards[0::2] != rewards[1::2]


def _pairs(batch: dict) -> float:
    return float(_ranked(batch).sum())


def _final_values(values: torch.Tensor, mb: dict, alignment: str) -> torch.Tensor:
    """Each row's last Q-view value: its predicted reward."""
    q, mask, _ = gather_response_values(values, mb["prompt_lengths"], mb["response_lengths"],
                                        alignment)
    return q.gather(1, (mask.sum(1) - 1).unsqueeze(1)).squeeze(1)


def over_heads(terms: Callable) -> Callable:
    """``terms(outputs, mb)`` of a one-value loss, made the mean over a K-head model's heads
    (each head on its own predictions); a one-head model's terms unchanged."""

    def mean_over_heads(outputs: dict, mb: dict):
        heads = heads_of(outputs["values"])
        if heads == 1:
            return terms(outputs, mb)
        values, rows = heads_as_rows(outputs["values"], mb)
        summed, stats = terms({**outputs, "values": values}, rows)
        return ({k: v / heads for k, v in summed.items()},
                {k: v / heads for k, v in stats.items()})

    return mean_over_heads


def _td_terms(gvm: GVMConfig):
    """(the TD(lambda) term, its count in a microbatch, its metrics) for ``gvm``."""
    prompt_value = gvm.train_prompt_value and gvm.alignment == "qview"

    def td(outputs, mb):
        return gvm_loss(outputs["values"], mb["prompt_lengths"], mb["response_lengths"],
                        mb["rewards"], gvm.gamma, gvm.lam, prompt_value, alignment=gvm.alignment)

    def metrics(s: dict[str, float]) -> dict[str, float]:
        # half the mean squared TD error over response tokens (docs/algorithm.md §1); the
        # objective adds the prompt-value terms of gvm.train_prompt_value
        return {"gvm/loss": 0.5 * s["response_sq_err_sum"] / s["response_tokens"],
                "gvm/objective": 0.5 * s["sq_err_sum"] / s["tokens"],
                "gvm/value_mean": s["value_sum"] / s["response_tokens"],
                "gvm/final_value_mean": s["final_value_sum"] / s["rows"]}

    def count(mb: dict) -> float:
        return loss_token_count(mb["response_lengths"], prompt_value)

    return td, count, metrics


def _pair_term(outputs, mb, alignment: str):
    """Summed Bradley-Terry loss of the microbatch's ordered pairs, and its stats."""
    reward = _final_values(outputs["values"], mb, alignment)
    ranked = _ranked(mb).to(reward.device)
    if not bool(ranked.any()):
        zero = reward.sum() * 0.0  # keeps the graph, so every microbatch has a backward
        return zero, {"pair_loss_sum": zero.detach(), "correct": zero.detach()}
    value, stats = bradley_terry_loss(reward[0::2][ranked], reward[1::2][ranked])
    return value, {"pair_loss_sum": value.detach(), "correct": stats["correct"]}


def td_objective(gvm: GVMConfig) -> Objective:
    td, count, td_metrics = _td_terms(gvm)

    def terms(outputs, mb):
        value, stats = td(outputs, mb)
        return {"td": value}, {k: stats[k] for k in TD_SUMS}

    return Objective(Loss(over_heads(terms), lambda mb: {"td": count(mb)}, TD_SUMS), False,
                     lambda s, counts: td_metrics(s),
                     ("gvm/loss", "gvm/value_mean", "gvm/pair_acc_last",
                      "perf/train_tokens_per_s"))


def td_pairwise_objective(gvm: GVMConfig) -> Objective:
    td, count, td_metrics = _td_terms(gvm)

    def terms(outputs, mb):
        value, stats = td(outputs, mb)
        pair, pair_stats = _pair_term(outputs, mb, gvm.alignment)
        return ({"td": value, "pairs": gvm.pairwise_weight * pair},
                {**{k: stats[k] for k in TD_SUMS}, **pair_stats})

    def metrics(s: dict[str, float], counts: Counts) -> dict[str, float]:
        pairs = max(counts["pairs"], 1.0)
        td = td_metrics(s)
        pair_loss = s["pair_loss_sum"] / pairs
        return {**td, "gvm/pair_loss": pair_loss, "gvm/train_pair_accuracy": s["correct"] / pairs,
                # what the optimizer minimises
                "gvm/loss_total": td["gvm/objective"] + gvm.pairwise_weight * pair_loss}

    return Objective(Loss(over_heads(terms), lambda mb: {"td": count(mb), "pairs": _pairs(mb)},
                          TD_SUMS + PAIR_SUMS), True,
                     metrics, ("gvm/loss", "gvm/pair_loss", "gvm/pair_acc_last",
                               "perf/train_tokens_per_s"))


def bradley_terry_objective(gvm: GVMConfig) -> Objective:
    """-log sigmoid(r_chosen - r_rejected) on the final values of whole pairs."""

    def terms(outputs, mb):
        value, stats = _pair_term(outputs, mb, gvm.alignment)
        return {"pairs": value}, {"loss_sum": stats["pair_loss_sum"], "correct": stats["correct"]}

    def metrics(s: dict[str, float], counts: Counts) -> dict[str, float]:
        pairs = max(counts["pairs"], 1.0)
        return {"rm/loss": s["loss_sum"] / pairs, "rm/train_accuracy": s["correct"] / pairs}

    return Objective(Loss(over_heads(terms), lambda mb: {"pairs": _pairs(mb)},
                          ("loss_sum", "correct")),
                     True, metrics, ("rm/loss", "rm/train_accuracy", "gvm/pair_acc_last"))


OBJECTIVES = {"td": td_objective, "td_pairwise": td_pairwise_objective,
              "bradley_terry": bradley_terry_objective}


def train_on_batch(model: TrainedModel, objective: Objective, batch: dict,
                   micro_batch_size: int, micro_batch_tokens: int = 0) -> UpdateResult:
    """One update of ``model`` on this rank's part of a global batch."""
    batch = to_device(batch)
    microbatches = forward.split_microbatches(
        micro_batch_size, micro_batch_tokens, batch["prompt_lengths"] + batch["response_lengths"],
        2 if objective.whole_pairs else 1, **batch)
    return model.update(microbatches, forward.gvm_values_head, objective.loss)
