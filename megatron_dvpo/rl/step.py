"""One RL iteration, top to bottom (docs/algorithm.md §2):

    prompts -> rollout -> score -> advantages -> policy update -> (scorer's own update) -> metrics

Every per-token tensor here is the same on all ranks of a model-parallel group: outputs made on
the last pipeline stage are broadcast once, so nothing below branches on the stage.
"""

from __future__ import annotations

import time

import torch
from megatron.core import parallel_state

from megatron_dvpo import distributed
from megatron_dvpo.models import forward
from megatron_dvpo.models.generation import Rollout
from megatron_dvpo.rl.advantages import masked_moments, whiten_with_moments
from megatron_dvpo.rl.estimators import (ESTIMATORS, GROUP_ESTIMATORS, Advantages,
                                         EstimatorInputs, Scores)
from megatron_dvpo.rl.gaming import repeat_counts, truncated
from megatron_dvpo.training.loop import StepResult


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


def rollout_metrics(rollout: Rollout, scores: Scores, estimate: EstimatorInputs,
                    advantages: torch.Tensor, eos_id: int, max_new_tokens: int,
                    final_value_tag: str) -> dict[str, float]:
    """docs/algorithm.md §4's rollout tags over the global batch; the scorer's prediction of
    each response's reward under the scorer's own ``final_value_tag``."""
    mask = rollout.response_mask
    kl = ((estimate.logp_old - estimate.logp_ref) * mask if estimate.logp_ref is not None
          else torch.zeros_like(estimate.logp_old))
    # rollout numerics (bf16 sampler) against the training forward (FP8 with precision.fp8)
    drift = (estimate.logp_old - rollout.logprobs).abs() * mask
    lengths = rollout.response_lengths
    repeated, grams = repeat_counts(rollout.responses, lengths)
    cut = truncated(rollout.responses, lengths, eos_id, max_new_tokens)
    ood = scores.out_of_range
    local = torch.stack([mask.sum(), torch.tensor(mask.shape[0], device=mask.device),
                         kl.sum(), scores.final_value.sum(), (advantages * mask).sum(),
                         (advantages.square() * mask).sum(), drift.sum(),
                         torch.tensor(repeated, device=mask.device),
                         torch.tensor(grams, device=mask.device), cut.sum(),
                         ood.sum() if ood is not None else mask.new_zeros(())]).double()
    torch.distributed.all_reduce(local, group=parallel_state.get_data_parallel_group())
    tokens, rows, kl_sum, final, adv, adv_sq, drift_sum, rep, gram, cut_rows, ood_sum = \
        local.tolist()
    adv_mean = adv / tokens
    gaming = {"rollout/repeat_rate": rep / max(gram, 1.0),
              "rollout/truncated_rate": cut_rows / rows}
    if ood is not None:
        gaming["rollout/gvm_value_ood_rate"] = ood_sum / tokens
    return {**gaming, "rollout/response_len_mean": tokens / rows,
            final_value_tag: final / rows,
            # the adaptive controller's quantity: summed per sequence (docs/algorithm.md §2)
            "rollout/kl_ref": kl_sum / rows, "rollout/kl_ref_per_token": kl_sum / tokens,
            "rollout/adv_mean": adv_mean,
            "rollout/adv_std": max(adv_sq / tokens - adv_mean ** 2, 0.0) ** 0.5,
            "rollout/logprob_diff": drift_sum / tokens}


def rl_step(job, step: int) -> StepResult:
    """``job`` is an ``RLTrainer``: its policy, reference, scorer, estimator and KL control."""
    cfg, rl = job.cfg, job.cfg.rl
    mbs, vocab = cfg.data.micro_batch_size, cfg.model.vocab_size
    seed = [cfg.seed, step + 1]
    # rollout.n_samples per prompt, next to each other on this rank: groups never span ranks,
    # so group statistics are exact
    prompts = [p for p in job.prompts.next_batch() for _ in range(cfg.rollout.n_samples)]
    start = time.perf_counter()
    rollout = job.rollout(prompts, step + 1)
    generated = time.perf_counter()
    scores = job.scorer.score(rollout)
    logp_ref = (response_logprobs(job.reference, rollout, vocab, mbs, job.temperature)
                if job.reference is not None else None)
    scored = time.perf_counter()
    logp_old = response_logprobs(job.policy.chunks, rollout, vocab, mbs, job.temperature)
    estimate = EstimatorInputs(rollout.response_mask, logp_old, logp_ref, job.kl.beta, rl.gamma,
                               rl.lam, job.whiten_state_values, cfg.rollout.n_samples,
                               rl.kl_estimator)
    result: Advantages = ESTIMATORS[job.estimator](scores, estimate)
    advantages = result.advantages
    if rl.whiten_advantages and job.estimator not in GROUP_ESTIMATORS:
        advantages = whiten_globally(advantages, rollout.response_mask)
    policy = job.update_policy(rollout, logp_old, advantages, seed)
    learned = job.scorer.learn(rollout, scores, result, seed + [1])
    refreshed = (job.refresh(step, prompts, rollout, scores.final_value)
                 if job.refresh is not None else None)
    trained = time.perf_counter()

    metrics = {**rollout_metrics(rollout, scores, estimate, advantages, job.tokenizer.eos_id,
                                 cfg.rollout.max_new_tokens, job.scorer.final_value_tag),
               **policy.metrics, **(learned.metrics if learned else {}),
               **(refreshed.metrics if refreshed else {})}
    job.kl.update(metrics["rollout/kl_ref"], job.samples_per_step)
    metrics["rollout/beta"] = job.kl.beta
    metrics.update(job.perf_metrics(rollout, generated - start, scored - generated,
                                    trained - scored))
    metrics.update(job.true_reward_metrics(prompts, rollout, step))
    updates = (policy.updates + (learned.updates if learned else [])
               + (refreshed.updates if refreshed else []))
    return StepResult(metrics, updates, stop=job.check_gaming(metrics, step + 1))
