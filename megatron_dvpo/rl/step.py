"""One RL iteration, top to bottom (docs/algorithm.md §2):

    prompts -> rollout -> score -> advantages -> policy update -> (scorer's own update) -> metrics

``rl_step`` reads only its ``RLParts``, built once by the trainer. Every per-token tensor here
is the same on all ranks of a model-parallel group: outputs made on the last pipeline stage are
broadcast once, so nothing below branches on the stage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from megatron.core import parallel_state

from megatron_dvpo import distributed
from megatron_dvpo.config import RunConfig
from megatron_dvpo.models import forward
from megatron_dvpo.models.generation import Rollout
from megatron_dvpo.rl.advantages import length_rewards, masked_moments, whiten_with_moments
from megatron_dvpo.rl.estimators import Advantages, Estimator, EstimatorInputs, Scores
from megatron_dvpo.rl.gaming import repeat_counts, truncated
from megatron_dvpo.rl.rollout_backend import RolloutBackend
from megatron_dvpo.rl.scorers import Scorer
from megatron_dvpo.rl.updates import update_policy
from megatron_dvpo.training.trained_model import TrainedModel, UpdateResult


@dataclass(frozen=True)
class RLParts:
    """What an RL step is made of. ``refresh(step, prompts, rollout, final_values)`` keeps the
    scorer in step with the policy (DVPO's GVM refresh), or is None."""

    cfg: RunConfig
    policy: TrainedModel
    backend: RolloutBackend
    scorer: Scorer
    reference: Optional[list[torch.nn.Module]]
    estimator: Estimator
    kl: object  # rl/advantages.py's adaptive or fixed KL controller
    temperature: float  # logp_old, logp and logp_ref come from the distribution sampled from
    eos_id: int
    whiten_state_values: bool = False
    refresh: Optional[Callable] = None


@dataclass(frozen=True)
class RLStepOutput:
    rollout: Rollout
    metrics: dict[str, float]
    updates: list[UpdateResult]
    histograms: dict[str, torch.Tensor]


# the response tokens' advantages each rank contributes to the step's histogram: enough for its
# shape, a few KiB to gather at any batch size
HISTOGRAM_TOKENS = 1024


def rollout_seed(step_seed: int) -> int:
    """Each data-parallel rank samples its own responses."""
    return step_seed * 1009 + parallel_state.get_data_parallel_rank()


def response_logprobs(chunks, rollout: Rollout, vocab_size: int, micro_batch_size: int,
                      temperature: float) -> torch.Tensor:
    """[B, T] log-probs of the response tokens (tempered), on every pipeline stage."""
    logprobs = forward.response_logprobs(chunks, rollout, vocab_size, micro_batch_size,
                                         temperature)
    return distributed.broadcast_from_last_stage(logprobs, tuple(rollout.response_mask.shape),
                                                 torch.float32)


def whiten_globally(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean 0, std 1 over all response tokens of the global batch (every data-parallel rank)."""
    moments = torch.stack([m.double() for m in masked_moments(advantages, mask)])
    torch.distributed.all_reduce(moments, group=parallel_state.get_data_parallel_group())
    return whiten_with_moments(advantages, mask, *moments.unbind())


def extremes(named: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each tensor's max and min over every data-parallel rank (``<name>_max``, ``_min``), in
    one all-reduce."""
    local = torch.cat([torch.stack([v.max(), -v.min()]).double() if v.numel()  # a rank may
                       else v.new_full((2,), float("-inf"), dtype=torch.float64)  # hold none
                       for v in named.values()])
    torch.distributed.all_reduce(local, op=torch.distributed.ReduceOp.MAX,
                                 group=parallel_state.get_data_parallel_group())
    values = local.tolist()
    return {f"{name}_{kind}": sign * value for i, name in enumerate(named)
            for kind, sign, value in (("max", 1, values[2 * i]), ("min", -1, values[2 * i + 1]))}


def token_kl(estimate: EstimatorInputs, mask: torch.Tensor) -> torch.Tensor:
    """Each response token's KL to the reference (``log pi_old - log pi_ref``), 0 without one."""
    if estimate.logp_ref is None:
        return torch.zeros_like(estimate.logp_old)
    return (estimate.logp_old - estimate.logp_ref) * mask


def rollout_histograms(rollout: Rollout, scores: Scores, estimate: EstimatorInputs,
                       advantages: torch.Tensor, final_value_tag: str) -> dict[str, torch.Tensor]:
    """The global batch's distributions, for TensorBoard's Histograms (``<tag>_hist`` beside
    the scalars' ``<tag>_mean``): each response's length, the scorer's prediction and KL to the
    reference, and the estimator's advantages (before whitening) of up to ``HISTOGRAM_TOKENS``
    response tokens per rank, evenly spaced."""
    mask = rollout.response_mask.bool()
    per_response = torch.stack([rollout.response_lengths.double(),
                                scores.final_value.double(),
                                token_kl(estimate, rollout.response_mask).double().sum(1)], 1)
    tokens = advantages[mask].double()
    picked = torch.full((HISTOGRAM_TOKENS,), float("nan"), dtype=torch.float64,
                        device=tokens.device)
    if tokens.numel():
        keep = min(tokens.numel(), HISTOGRAM_TOKENS)
        index = torch.linspace(0, tokens.numel() - 1, keep, device=tokens.device).long()
        picked[:keep] = tokens[index]
    per_response = distributed.gather_data_parallel(per_response)
    picked = distributed.gather_data_parallel(picked)
    return {"rollout/response_len_hist": per_response[:, 0],
            final_value_tag.removesuffix("_mean") + "_hist": per_response[:, 1],
            "rollout/kl_ref_hist": per_response[:, 2],
            "rollout/adv_hist": picked[~picked.isnan()]}


def _std(total: float, squares: float, count: float) -> float:
    return max(squares / count - (total / count) ** 2, 0.0) ** 0.5


def rollout_metrics(rollout: Rollout, scores: Scores, estimate: EstimatorInputs,
                    advantages: torch.Tensor, cut: torch.Tensor,
                    final_value_tag: str) -> dict[str, float]:
    """docs/algorithm.md §4's rollout tags over the global batch; the scorer's prediction of
    each response's reward under the scorer's own ``final_value_tag``. ``advantages``: the
    estimator's, before any whitening (whitened ones have mean 0 and std 1 by construction);
    ``cut`` [B]: the responses cut at the length limit (``gaming.truncated``)."""
    mask = rollout.response_mask
    kl = token_kl(estimate, mask)
    # rollout numerics (bf16 sampler) against the training forward (FP8 with precision.fp8)
    drift = (estimate.logp_old - rollout.logprobs).abs() * mask
    lengths = rollout.response_lengths
    repeated, grams = repeat_counts(rollout.responses, lengths)
    ood, spread, disagrees = scores.out_of_range, scores.head_spread, scores.disagrees
    prompt_lengths = rollout.prompt_width - rollout.prompt_pad
    zero = mask.new_zeros(())
    local = torch.stack([mask.sum(), torch.tensor(mask.shape[0], device=mask.device),
                         kl.sum(), scores.final_value.sum(), (advantages * mask).sum(),
                         (advantages.square() * mask).sum(), drift.sum(),
                         torch.tensor(repeated, device=mask.device),
                         torch.tensor(grams, device=mask.device), cut.sum(),
                         ood.sum() if ood is not None else zero,
                         lengths.double().square().sum(),
                         scores.final_value.double().square().sum(),
                         (spread * mask).sum() if spread is not None else zero,
                         spread.gather(1, (lengths - 1)[:, None]).sum()
                         if spread is not None else zero,
                         disagrees.sum() if disagrees is not None else zero,
                         prompt_lengths.sum()]).double()
    torch.distributed.all_reduce(local, group=parallel_state.get_data_parallel_group())
    tokens, rows, kl_sum, final, adv, adv_sq, drift_sum, rep, gram, cut_rows, ood_sum, \
        len_sq, final_sq, spread_sum, final_spread, disagree_sum, prompt_sum = local.tolist()
    adv_mean = adv / tokens
    gaming = {"rollout/repeat_rate": rep / max(gram, 1.0),
              "rollout/truncated_rate": cut_rows / rows}
    if ood is not None:
        gaming["rollout/gvm_value_ood_rate"] = ood_sum / tokens
    if spread is not None:  # a K-head GVM: how much its heads disagree on these responses
        gaming.update({"rollout/gvm_head_std_mean": spread_sum / tokens,
                       "rollout/gvm_head_std_final": final_spread / rows})
    if disagrees is not None:
        gaming["rollout/gvm_head_disagree_rate"] = disagree_sum / tokens
    final_name = final_value_tag.removesuffix("_mean")
    spread = extremes({"rollout/response_len": lengths, final_name: scores.final_value,
                       "rollout/adv": advantages[mask.bool()],
                       "rollout/prompt_len": prompt_lengths})
    return {**gaming, **spread, "rollout/response_len_mean": tokens / rows,
            "rollout/prompt_len_mean": prompt_sum / rows,
            "rollout/response_len_std": _std(tokens, len_sq, rows),
            final_value_tag: final / rows, f"{final_name}_std": _std(final, final_sq, rows),
            # the adaptive controller's quantity: summed per sequence (docs/algorithm.md §2)
            "rollout/kl_ref": kl_sum / rows, "rollout/kl_ref_per_token": kl_sum / tokens,
            "rollout/adv_mean": adv_mean,
            "rollout/adv_std": _std(adv, adv_sq, tokens),
            "rollout/logprob_diff": drift_sum / tokens}


def step_length_rewards(rollout: Rollout, rl, eos_id: int, cut: torch.Tensor
                        ) -> torch.Tensor | None:
    """The rollout's ``length_rewards`` under ``rl.length_penalty`` and
    ``rl.truncation_penalty`` (``cut``: its truncated responses); None when both are 0."""
    if not (rl.length_penalty or rl.truncation_penalty):
        return None
    return length_rewards(rollout.response_mask, rollout.responses == eos_id, cut,
                          rl.length_penalty, rl.truncation_penalty)


class Phases:
    """Seconds of each phase of a step, each timed from the end of the one before."""

    def __init__(self):
        self.last, self.seconds = time.perf_counter(), {}

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name], self.last = now - self.last, now


def perf_metrics(rollout: Rollout, epochs: int, phases: dict[str, float]) -> dict[str, float]:
    """Rates and times of a step: generation, scoring (the scorer and the reference) and
    training (old log-probs, advantages, updates) as ``perf/*``, and every phase apart as
    ``timing_s/*`` (verl's names); the step's prompt and response tokens (``perf/tokens``)."""
    mask = rollout.response_mask
    gen_tokens = distributed.all_reduce_data_parallel(float(mask.sum()))
    seq_tokens = distributed.all_reduce_data_parallel(float(
        (rollout.prompt_width - rollout.prompt_pad + rollout.response_lengths).sum()))
    score_s = phases["scorer"] + phases["reference"]
    train_s = phases["old_logprob"] + phases["advantages"] + phases["update"]
    return {"perf/gen_tokens_per_s": gen_tokens / phases["gen"],
            "perf/train_tokens_per_s": seq_tokens * epochs / train_s,
            "perf/tokens": seq_tokens,
            "perf/gen_time_s": phases["gen"], "perf/score_time_s": score_s,
            "perf/train_time_s": train_s,
            **{f"timing_s/{name}": seconds for name, seconds in phases.items()
               if name != "gen"}}


def rl_step(parts: RLParts, prompts: list[list[int]], step: int) -> RLStepOutput:
    """``prompts``: this rank's, ``rollout.n_samples`` copies of each next to each other, so
    groups never span ranks and group statistics are exact."""
    cfg, rl = parts.cfg, parts.cfg.rl
    mbs, vocab = cfg.data.micro_batch_size, cfg.model.vocab_size
    seed = [cfg.seed, step + 1]
    phases = Phases()
    rollout = parts.backend.generate(prompts, rollout_seed(step + 1))
    phases.done("gen")
    scores = parts.scorer.score(rollout)
    phases.done("scorer")
    logp_ref = (response_logprobs(parts.reference, rollout, vocab, mbs, parts.temperature)
                if parts.reference is not None else None)
    phases.done("reference")
    logp_old = response_logprobs(parts.policy.chunks, rollout, vocab, mbs, parts.temperature)
    phases.done("old_logprob")
    cut = truncated(rollout.responses, rollout.response_lengths, parts.eos_id,
                    cfg.rollout.max_new_tokens)
    estimate = EstimatorInputs(rollout.response_mask, logp_old, logp_ref, parts.kl.beta,
                               rl.gamma, rl.lam, parts.whiten_state_values,
                               cfg.rollout.n_samples, rl.kl_estimator,
                               step_length_rewards(rollout, rl, parts.eos_id, cut))
    result: Advantages = parts.estimator(scores, estimate)
    advantages = result.advantages
    if rl.whiten_advantages and not parts.estimator.grouped:
        advantages = whiten_globally(advantages, rollout.response_mask)
    phases.done("advantages")
    policy = update_policy(parts.policy, rollout, logp_old, advantages, rl, cfg.data, vocab,
                           parts.temperature, seed, cfg.rollout.max_new_tokens)
    parts.backend.sync_weights()
    learned = parts.scorer.learn(rollout, scores, result, seed + [1])
    refreshed = (parts.refresh(step, prompts, rollout, scores.final_value)
                 if parts.refresh is not None else None)
    phases.done("update")

    final_value_tag = parts.scorer.final_value_tag
    metrics = {**rollout_metrics(rollout, scores, estimate, result.advantages, cut,
                                 final_value_tag),
               **policy.metrics, **(learned.metrics if learned else {}),
               **(refreshed.metrics if refreshed else {})}
    parts.kl.update(metrics["rollout/kl_ref"],
                    cfg.data.global_batch_size * cfg.rollout.n_samples)
    metrics["rollout/beta"] = parts.kl.beta
    metrics.update(perf_metrics(rollout, rl.ppo_epochs, phases.seconds))
    updates = (policy.updates + (learned.updates if learned else [])
               + (refreshed.updates if refreshed else []))
    return RLStepOutput(rollout, metrics, updates, rollout_histograms(
        rollout, scores, estimate, result.advantages, final_value_tag))
