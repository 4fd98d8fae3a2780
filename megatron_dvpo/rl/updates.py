"""The update loop every RL model shares: ``epochs`` passes over shuffled minibatches of a
rollout, one ``TrainedModel.update`` each (the policy's loss of ``rl.policy_loss``, PPO's
critic loss of ``ppo.value_loss``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from megatron.core import parallel_state

from megatron_dvpo.config import ConfigError, DataConfig, RLConfig
from megatron_dvpo.device import device
from megatron_dvpo.models import forward
from megatron_dvpo.models.forward import Head
from megatron_dvpo.models.generation import Rollout
from megatron_dvpo.rl.advantages import masked_moments
from megatron_dvpo.rl.losses import VALUE_LOSSES
from megatron_dvpo.rl.policy_loss import (POLICY_LOSSES, PolicyLossOptions, aggregation_count,
                                          entropy_bonus, importance_weights,
                                          should_skip_minibatch)
from megatron_dvpo.training.loss import Loss
from megatron_dvpo.training.trained_model import RATIO_THRESHOLD, TrainedModel, UpdateResult

POLICY_SUMS = ("tokens", "count", "loss_sum", "clipfrac_sum", "dual_clipfrac_sum",
               "approx_kl_sum", "ratio_sum", "entropy_sum")
CRITIC_SUMS = ("tokens", "loss_sum", "clipfrac_sum")


@dataclass(frozen=True)
class UpdateSummary:
    """A model's updates of one step and their metrics (applied updates only)."""

    metrics: dict[str, float]
    updates: list[UpdateResult]


def minibatch_epochs(model: TrainedModel, rollout: Rollout, per_token: dict[str, torch.Tensor],
                     rl: RLConfig, data: DataConfig, seed: list[int], head: Head, loss: Loss,
                     accept: Optional[Callable[[dict[str, float]], bool]] = None
                     ) -> list[UpdateResult]:
    """``rl.ppo_epochs`` x ``rl.minibatches`` updates of ``model`` on the rollout's rows;
    ``accept(sums)`` may refuse an update (the ratio threshold). Microbatches are
    ``data.micro_batch_size`` rows, or up to ``data.micro_batch_tokens`` tokens each."""
    micro_batch_size = data.micro_batch_size
    rows = rollout.tokens.shape[0]
    if not data.micro_batch_tokens and rows % (rl.minibatches * micro_batch_size):
        raise ConfigError(f"{rows} rollouts per data-parallel rank do not split into "
                          f"rl.minibatches={rl.minibatches} of whole microbatches of "
                          f"data.micro_batch_size={micro_batch_size}")
    tensors = {"tokens": rollout.tokens, "left_pad": rollout.prompt_pad,
               "mask": rollout.response_mask, **per_token}
    lengths = rollout.prompt_width + rollout.response_lengths
    generator = np.random.default_rng(seed)
    done = []
    for _ in range(rl.ppo_epochs):
        for chosen in np.array_split(generator.permutation(rows), rl.minibatches):
            index = torch.as_tensor(chosen, device=device())
            microbatches = forward.split_microbatches(
                micro_batch_size, data.micro_batch_tokens, lengths[index],
                **{k: v[index] for k, v in tensors.items()})
            done.append(model.update(microbatches, head, loss, accept))
    model.sync_params()  # the next rollout or scoring pass reads the stepped weights
    return done


def _means(done: list[UpdateResult], prefix: str, names: dict[str, str]) -> dict[str, float]:
    """Token means of the applied updates' sums, their mean gradient norm, and a mixture of
    experts' router metrics (``models/moe.py``) averaged over the updates."""
    applied = [d for d in done if d.applied]
    tokens = max(sum(d.sums["tokens"] for d in applied), 1.0)
    metrics = {f"{prefix}/{tag}": sum(d.sums[key] for d in applied) / tokens
               for tag, key in names.items()}
    norms = [d.grad_norm for d in applied]
    metrics[f"{prefix}/grad_norm"] = float(np.mean(norms)) if norms else 0.0
    routed = [d.router for d in done if d.router]
    metrics.update({f"{prefix}/{tag}": float(np.mean([r[tag] for r in routed]))
                    for tag in (routed[0] if routed else {})})
    return metrics


def policy_loss(rl: RLConfig, horizon: int = 1) -> Loss:
    """``rl.policy_loss`` (docs/algorithm.md §2, step 7, and "Policy-loss options") with the
    entropy bonus, over ``rl.loss_agg_mode``'s count; ``horizon``: rollout.max_new_tokens,
    the constant of ``seq-mean-token-sum-norm``."""
    options = PolicyLossOptions(rl.clip_eps, rl.dual_clip, rl.log_ratio_clamp,
                                rl.loss_agg_mode, horizon)
    surrogate = POLICY_LOSSES[rl.policy_loss]

    def terms(outputs, batch):
        m = batch["mask"]
        entropy = outputs["entropy"]
        loss, stats = surrogate(outputs["logprobs"], batch["logp_old"], batch["advantages"], m,
                                options, batch.get("is_weights"))
        if rl.entropy_coef > 0:
            loss = loss + entropy_bonus(entropy, m, rl.entropy_coef, options.agg)
        return {"policy": loss}, {**stats, "loss_sum": loss.detach(),
                                  "entropy_sum": (entropy.detach() * m).sum()}

    def counts(batch):
        return {"policy": aggregation_count(batch["mask"], options.agg, horizon)}

    return Loss(terms, counts, POLICY_SUMS)


def update_policy(policy: TrainedModel, rollout: Rollout, logp_old: torch.Tensor,
                  advantages: torch.Tensor, rl: RLConfig, data: DataConfig,
                  vocab_size: int, temperature: float, seed: list[int],
                  horizon: int = 1) -> UpdateSummary:
    """The policy loss over the rollout, minibatches skipped past the ratio threshold."""
    # the response's positions only; the entropy is logged always, and differentiated only for
    # the entropy bonus
    head = forward.policy_logprobs_head(vocab_size, temperature, entropy=True,
                                        entropy_grad=rl.entropy_coef > 0,
                                        start=rollout.prompt_width - 1,
                                        chunk=forward.LOGPROB_CHUNK)
    weights, is_stats = importance_weights(logp_old, rollout.logprobs, rollout.response_mask,
                                           rl.is_correction, rl.is_cap)

    def accept(sums: dict[str, float]) -> bool:
        return not should_skip_minibatch(sums["ratio_sum"] / sums["tokens"], rl.ratio_threshold)

    per_token = {"logp_old": logp_old, "advantages": advantages}
    if weights is not None:
        per_token["is_weights"] = weights
    done = minibatch_epochs(policy, rollout, per_token, rl, data, seed, head,
                            policy_loss(rl, horizon), accept)
    metrics = _means(done, "policy", {"clipfrac": "clipfrac_sum",
                                      "dual_clipfrac": "dual_clipfrac_sum",
                                      "approx_kl": "approx_kl_sum", "ratio_mean": "ratio_sum",
                                      "entropy": "entropy_sum"})
    applied = [d for d in done if d.applied]  # the loss is a mean over its own count
    metrics["policy/loss"] = (sum(d.sums["loss_sum"] for d in applied)
                              / max(sum(d.sums["count"] for d in applied), 1.0))
    metrics["policy/lr"] = policy.lr
    metrics["policy/skipped_minibatches"] = float(sum(
        d.skipped_for == RATIO_THRESHOLD for d in done))
    if rl.is_correction != "none":
        metrics.update(importance_metrics(is_stats))
    return UpdateSummary(metrics, done)


def importance_metrics(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """The sampler/training ratio over the global batch: its mean and largest value, and the
    share of tokens the correction changed."""
    sums = torch.stack([stats["tokens"], stats["ratio_sum"], stats["corrected_sum"]]).double()
    torch.distributed.all_reduce(sums, group=parallel_state.get_data_parallel_group())
    top = stats["ratio_max"].double().reshape(1)
    torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX,
                                 group=parallel_state.get_data_parallel_group())
    tokens, ratio, corrected = sums.tolist()
    return {"policy/is_ratio_mean": ratio / max(tokens, 1.0), "policy/is_ratio_max": top.item(),
            "policy/is_corrected_frac": corrected / max(tokens, 1.0)}


def update_critic(critic: TrainedModel, rollout: Rollout, old_values: torch.Tensor,
                  returns: torch.Tensor, rl: RLConfig, value_loss: str, value_clip_eps: float,
                  data: DataConfig, seed: list[int]) -> UpdateSummary:
    """PPO's value loss (``ppo.value_loss``) toward the GAE returns (docs/algorithm.md §3)."""
    width = rollout.prompt_width
    loss_of = VALUE_LOSSES[value_loss]

    def terms(outputs, batch):
        # V(s_t) is the output before token t: the last prompt token's, then y_0, y_1, ...
        steps = batch["mask"].shape[1]  # the microbatch's (token-budget ones are cut)
        values = outputs["values"][:, width - 1:width - 1 + steps]
        loss, stats = loss_of(values, batch["old_values"], batch["returns"], batch["mask"],
                              value_clip_eps)
        return {"value": loss}, {**stats, "loss_sum": loss.detach()}

    loss = Loss(terms, lambda batch: {"value": batch["mask"].sum()}, CRITIC_SUMS)
    done = minibatch_epochs(critic, rollout, {"old_values": old_values, "returns": returns},
                            rl, data, seed, forward.gvm_values_head, loss)
    metrics = _means(done, "critic", {"loss": "loss_sum", "clipfrac": "clipfrac_sum"})
    metrics["critic/vf_explained_var"] = explained_variance(old_values, returns,
                                                            rollout.response_mask)
    return UpdateSummary(metrics, done)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """``1 - Var(R - V) / Var(R)`` over the response tokens of every data-parallel rank: how
    much of the returns the critic's rollout values explained (1: all, 0: no better than their
    mean, below 0: worse)."""
    sums = torch.stack([*masked_moments(returns, mask), *masked_moments(returns - values, mask)])
    torch.distributed.all_reduce(sums, group=parallel_state.get_data_parallel_group())
    total, squares, count, res_total, res_squares, _ = sums.tolist()
    variance = squares / count - (total / count) ** 2
    res_variance = res_squares / count - (res_total / count) ** 2
    return 1.0 - res_variance / variance if variance > 0 else 0.0
