"""What a value model learns from a batch of the value dataset: TD(lambda) token values (the
GVM, docs/algorithm.md §1) or Bradley-Terry sequence rewards (PPO's reward model, §3).

An objective turns one collated batch into a loss function for ``TrainedModel.update`` and
turns the summed statistics of the whole global batch into tagged metrics. Losses are sums
divided by the global normaliser (times the data-parallel size, since megatron DDP averages
gradients over replicas), so gradients do not depend on the micro-batch or DP split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from megatron_dvpo.config import GVMConfig
from megatron_dvpo.gvm.td import gvm_loss, loss_token_count
from megatron_dvpo.models.forward import LossFn
from megatron_dvpo.rl.losses import bradley_terry_loss


@dataclass(frozen=True)
class Objective:
    """``normalizer(batch)``: this rank's count (all-reduced by the trainer);
    ``loss_fn(normalizer, dp)``: the per-microbatch loss; ``metrics(sums, normalizer)``."""

    sums: tuple[str, ...]
    whole_pairs: bool  # batches hold (chosen, rejected) rows next to each other
    normalizer: Callable[[dict], float]
    loss_fn: Callable[[float, int], LossFn]
    metrics: Callable[[dict[str, float], float], dict[str, float]]
    summary_tags: tuple[str, ...]


def td_objective(gvm: GVMConfig) -> Objective:
    prompt_value = gvm.train_prompt_value and gvm.alignment == "qview"
    sums = ("sq_err_sum", "tokens", "response_sq_err_sum", "value_sum", "response_tokens",
            "final_value_sum", "rows")

    def loss_fn(tokens: float, dp: int) -> LossFn:
        def loss(outputs, mb):
            value, stats = gvm_loss(outputs["values"], mb["prompt_lengths"], mb["response_lengths"],
                                    mb["rewards"], gvm.gamma, gvm.lam, prompt_value,
                                    normalizer=tokens, alignment=gvm.alignment)
            return value * dp, {k: stats[k] for k in sums}
        return loss

    def metrics(s: dict[str, float], tokens: float) -> dict[str, float]:
        # half the mean squared TD error over response tokens (docs/algorithm.md §1); the
        # objective adds the prompt-value terms of gvm.train_prompt_value
        return {"gvm/loss": 0.5 * s["response_sq_err_sum"] / s["response_tokens"],
                "gvm/objective": 0.5 * s["sq_err_sum"] / s["tokens"],
                "gvm/value_mean": s["value_sum"] / s["response_tokens"],
                "gvm/final_value_mean": s["final_value_sum"] / s["rows"]}

    return Objective(sums, False,
                     lambda batch: loss_token_count(batch["response_lengths"], prompt_value),
                     loss_fn, metrics,
                     ("gvm/loss", "gvm/value_mean", "gvm/pair_acc_last",
                      "perf/train_tokens_per_s"))


def bradley_terry_objective(gvm: GVMConfig) -> Objective:
    """-log sigmoid(r_chosen - r_rejected) on the last-token values of whole pairs."""

    def loss_fn(pairs: float, dp: int) -> LossFn:
        def loss(outputs, mb):
            last = (mb["prompt_lengths"] + mb["response_lengths"] - 1)[:, None]
            reward = outputs["values"].gather(1, last).squeeze(1)
            value, stats = bradley_terry_loss(reward[0::2], reward[1::2])
            n = reward.shape[0] / 2
            return value * n / pairs * dp, {"loss_sum": value.detach() * n,
                                            "correct": stats["accuracy"] * n}
        return loss

    def metrics(s: dict[str, float], pairs: float) -> dict[str, float]:
        return {"rm/loss": s["loss_sum"] / pairs, "rm/train_accuracy": s["correct"] / pairs}

    return Objective(("loss_sum", "correct"), True,
                     lambda batch: batch["tokens"].shape[0] / 2, loss_fn, metrics,
                     ("rm/loss", "rm/train_accuracy", "gvm/pair_acc_last"))


OBJECTIVES = {"td": td_objective, "bradley_terry": bradley_terry_objective}
