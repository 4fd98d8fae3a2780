"""GVM refresh, semi-online DVPO (docs/algorithm.md §2.4): the frozen GVM's way to follow a
policy that has moved off the data it was trained on, where it can be gamed.

Every ``dvpo.refresh_interval`` steps, the step's prompts get a second sample from the policy.
The user's scorer ranks each prompt's two samples into a (chosen, rejected) pair, labelled like
the GVM's own preference data (a tie: both at the labels' midpoint). The GVM then continues its
own objective on these pairs for ``dvpo.refresh_updates`` steps, and the next step scores with
it. ``gvm_refresh/pair_accuracy_before`` is how well the GVM ranked the new pairs before it
learnt from them: the policy's exploit of it shows there first.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from megatron_dvpo import distributed
from megatron_dvpo.config import OptimizerConfig, RunConfig
from megatron_dvpo.data.dataset import collate
from megatron_dvpo.data.preference import Sample
from megatron_dvpo.gvm.objectives import OBJECTIVES, train_on_batch
from megatron_dvpo.models.generation import Rollout, rollout_responses
from megatron_dvpo.training.trained_model import TrainedModel, UpdateResult

REFRESH_SEED = 7919  # the second sample's seed stream, apart from the rollouts'


def refresh_optimizer(cfg: RunConfig) -> OptimizerConfig:
    """The policy's optimizer settings at ``dvpo.refresh_lr``, constant: a refresh continues a
    trained model, it does not warm one up."""
    return dataclasses.replace(cfg.optimizer, lr=cfg.dvpo.refresh_lr, min_lr=cfg.dvpo.refresh_lr,
                               lr_warmup_steps=0, lr_decay_style="constant")


def refresh_updates_total(cfg: RunConfig) -> int:
    return max(cfg.train_steps // cfg.dvpo.refresh_interval, 1) * cfg.dvpo.refresh_updates


def ranked_pairs(prompts: list[list[int]], first: Rollout, second: Rollout,
                 first_scores: list[float], second_scores: list[float],
                 labels: tuple[float, float]) -> tuple[list[Sample], int]:
    """(chosen, rejected, ...) samples of each prompt's two responses, and the number of ties."""
    chosen_label, rejected_label = labels
    tie = (chosen_label + rejected_label) / 2
    samples, ties = [], 0
    for i, (prompt, a, b) in enumerate(zip(prompts, rollout_responses(first),
                                           rollout_responses(second))):
        if first_scores[i] == second_scores[i]:
            ties += 1
            samples += [Sample(prompt, a, tie), Sample(prompt, b, tie)]
            continue
        if first_scores[i] < second_scores[i]:
            a, b = b, a
        samples += [Sample(prompt, a, chosen_label), Sample(prompt, b, rejected_label)]
    return samples, ties


@dataclass(frozen=True)
class Refreshed:
    metrics: dict[str, float]
    updates: list[UpdateResult]


class GVMRefresh:
    """The GVM's trained ``model`` (``score(rollout)`` gives its final values), the policy's
    sampler ``sample(prompts, step_seed)`` and the user's ``score_text(prompts, rollout)``;
    called once per step by ``rl_step``."""

    def __init__(self, cfg: RunConfig, gvm_cfg: RunConfig, model: TrainedModel,
                 score: Callable[[Rollout], torch.Tensor], pad_id: int,
                 sample: Callable[[list[list[int]], int], Rollout],
                 score_text: Callable[[list[list[int]], Rollout], list[float]]):
        self.interval, self.updates = cfg.dvpo.refresh_interval, cfg.dvpo.refresh_updates
        self.objective = OBJECTIVES[gvm_cfg.gvm.objective](gvm_cfg.gvm)
        self.labels = (gvm_cfg.data.chosen_reward, gvm_cfg.data.rejected_reward)
        self.model, self.score, self.pad_id = model, score, pad_id
        self.sample, self.score_text = sample, score_text
        # whole pairs in every microbatch, for the objectives with a pairwise term
        self.micro_batch_size = 2 * max(cfg.data.micro_batch_size // 2, 1)

    def __call__(self, step: int, prompts: list[list[int]], rollout: Rollout,
                 final_values: torch.Tensor) -> Refreshed | None:
        if (step + 1) % self.interval:
            return None
        second = self.sample(prompts, REFRESH_SEED + step)
        first_scores = self.score_text(prompts, rollout)
        second_scores = self.score_text(prompts, second)
        before = self._ranked_correctly(final_values, self.score(second),
                                        first_scores, second_scores)
        samples, ties = ranked_pairs(prompts, rollout, second, first_scores, second_scores,
                                     self.labels)
        width = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
        if len(samples) % self.micro_batch_size:  # whole microbatches: repeat the first pairs
            samples += samples[:self.micro_batch_size - len(samples) % self.micro_batch_size]
        batch = collate(samples, width, self.pad_id)
        trained = [train_on_batch(self.model, self.objective, batch, self.micro_batch_size)
                   for _ in range(self.updates)]
        self.model.sync_params()  # the next step scores with the refreshed weights
        pairs = distributed.all_reduce_data_parallel(float(len(prompts)))
        metrics = {f"gvm_refresh/{tag.split('/')[-1]}": value
                   for tag, value in self.objective.metrics(trained[-1]).items()}
        metrics.update({
            "gvm_refresh/pairs": pairs,
            "gvm_refresh/tied_rate": distributed.all_reduce_data_parallel(float(ties)) / pairs,
            "gvm_refresh/pair_accuracy_before": before / pairs,
            "gvm_refresh/true_reward_mean": distributed.all_reduce_data_parallel(
                sum(first_scores) + sum(second_scores)) / (2 * pairs)})
        return Refreshed(metrics, trained)

    @staticmethod
    def _ranked_correctly(first_values: torch.Tensor, second_values: torch.Tensor,
                          first_scores: list[float], second_scores: list[float]) -> float:
        """Pairs (over all replicas) the GVM orders as the scorer does; a tie on either side
        counts half."""
        gvm = torch.sign(first_values - second_values).cpu()
        truth = torch.sign(torch.tensor(first_scores) - torch.tensor(second_scores))
        agree = torch.where((gvm == 0) | (truth == 0), 0.5, (gvm == truth).double())
        return distributed.all_reduce_data_parallel(float(agree.sum()))
