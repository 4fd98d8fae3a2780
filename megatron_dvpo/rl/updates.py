"""The update loop every RL model shares: ``epochs`` passes over shuffled minibatches of a
rollout, one ``TrainedModel.update`` each (the policy's clipped surrogate, PPO's critic)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from megatron.core import parallel_state

from megatron_dvpo import distributed
from megatron_dvpo.config import ConfigError, DataConfig, RLConfig
from megatron_dvpo.device import device
from megatron_dvpo.models import forward
from megatron_dvpo.models.forward import Head, LossFn
from megatron_dvpo.models.generation import Rollout
from megatron_dvpo.rl.losses import (aggregation_count, entropy_bonus, importance_weights,
                                     ppo_policy_loss, should_skip_minibatch, value_loss_clipped)
from megatron_dvpo.training.trained_model import RATIO_THRESHOLD, TrainedModel, UpdateResult

POLICY_SUMS = ("tokens", "count", "loss_sum", "clipfrac_sum", "dual_clipfrac_sum",
               "approx_kl_sum", "ratio_sum", "entropy_sum")
CRITIC_SUMS = ("tokens", "loss_sum", "clipfrac_sum")


@dataclass(frozen=True)
class MinibatchUpdate:
    update: UpdateResult
    sums: dict[str, float]  # the loss's statistics over the minibatch, summed over replicas


@dataclass(frozen=True)
class UpdateSummary:
    """A model's updates of one step and their metrics (applied updates only)."""

    metrics: dict[str, float]
    updates: list[UpdateResult]


def minibatch_epochs(model: TrainedModel, rollout: Rollout, per_token: dict[str, torch.Tensor],
                     rl: RLConfig, data: DataConfig, seed: list[int], head: Head,
                     loss_for: Callable[[float], LossFn], keys: tuple[str, ...],
                     accept: Optional[Callable[[dict[str, float]], bool]] = None,
                     count: Callable[[torch.Tensor], torch.Tensor] = lambda mask: mask.sum()
                     ) -> list[MinibatchUpdate]:
    """``rl.ppo_epochs`` x ``rl.minibatches`` updates of ``model`` on the rollout's rows.

    ``loss_for(normalizer)`` builds the loss of a minibatch whose ``count(mask)`` (its
    response tokens by default) over all replicas is ``normalizer``; ``accept(sums)`` may refuse
    an update (the ratio threshold). Microbatches are ``data.micro_batch_size`` rows, or up to
    ``data.micro_batch_tokens`` tokens each.
    """
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
            normalizer = distributed.all_reduce_data_parallel(
                float(count(rollout.response_mask[index])))
            sums: dict[str, float] = {}

            def check(outputs: list[dict]) -> bool:
                local = ({k: sum(float(o[k]) for o in outputs) for k in keys}
                         if outputs else None)
                sums.update(distributed.sum_over_replicas(list(keys), local))
                return accept is None or accept(sums)

            microbatches = forward.split_microbatches(
                micro_batch_size, data.micro_batch_tokens, lengths[index],
                **{k: v[index] for k, v in tensors.items()})
            update = model.update(microbatches, head, loss_for(normalizer), check)
            done.append(MinibatchUpdate(update, sums))
    model.sync_params()  # the next rollout or scoring pass reads the stepped weights
    return done


def _means(done: list[MinibatchUpdate], prefix: str, names: dict[str, str]) -> dict[str, float]:
    """Token means of the applied updates' sums, and their mean gradient norm."""
    applied = [d for d in done if d.update.applied]
    tokens = max(sum(d.sums["tokens"] for d in applied), 1.0)
    metrics = {f"{prefix}/{tag}": sum(d.sums[key] for d in applied) / tokens
               for tag, key in names.items()}
    norms = [d.update.grad_norm for d in applied]
    metrics[f"{prefix}/grad_norm"] = float(np.mean(norms)) if norms else 0.0
    return metrics


def update_policy(policy: TrainedModel, rollout: Rollout, logp_old: torch.Tensor,
                  advantages: torch.Tensor, rl: RLConfig, data: DataConfig,
                  vocab_size: int, temperature: float, seed: list[int],
                  horizon: int = 1) -> UpdateSummary:
    """The clipped surrogate (docs/algorithm.md §2, step 7, and "Policy-loss options"),
    minibatches skipped past the ratio threshold. ``horizon``: rollout.max_new_tokens, the
    constant of ``rl.loss_agg_mode=seq-mean-token-sum-norm``."""
    # the response's positions only; the entropy is logged always, and differentiated only for
    # the entropy bonus
    head = forward.policy_logprobs_head(vocab_size, temperature, entropy=True,
                                        entropy_grad=rl.entropy_coef > 0,
                                        start=rollout.prompt_width - 1,
                                        chunk=forward.LOGPROB_CHUNK)
    agg = rl.loss_agg_mode
    weights, is_stats = importance_weights(logp_old, rollout.logprobs, rollout.response_mask,
                                           rl.is_correction, rl.is_cap)

    def loss_for(normalizer: float) -> LossFn:
        def loss_fn(outputs, batch):
            m = batch["mask"]
            logp, entropy = outputs["logprobs"], outputs["entropy"]
            loss, stats = ppo_policy_loss(logp, batch["logp_old"], batch["advantages"], m,
                                          rl.clip_eps, normalizer, dual_clip=rl.dual_clip,
                                          log_ratio_clamp=rl.log_ratio_clamp, agg=agg,
                                          horizon=horizon, weights=batch.get("is_weights"))
            if rl.entropy_coef > 0:
                loss = loss + entropy_bonus(entropy, m, rl.entropy_coef, normalizer, agg,
                                            horizon)
            return loss, {"tokens": stats["tokens"], "loss_sum": loss.detach() * normalizer,
                               "clipfrac_sum": stats["clipfrac_sum"],
                               "dual_clipfrac_sum": stats["dual_clipfrac_sum"],
                               "approx_kl_sum": stats["approx_kl_sum"],
                               "ratio_sum": stats["ratio_sum"],
                               "entropy_sum": (entropy.detach() * m).sum(),
                               "count": aggregation_count(m, agg, horizon).to(loss.dtype)}
        return loss_fn

    def accept(sums: dict[str, float]) -> bool:
        return not should_skip_minibatch(sums["ratio_sum"] / sums["tokens"], rl.ratio_threshold)

    per_token = {"logp_old": logp_old, "advantages": advantages}
    if weights is not None:
        per_token["is_weights"] = weights
    done = minibatch_epochs(policy, rollout, per_token, rl, data, seed, head, loss_for,
                            POLICY_SUMS, accept, lambda mask: aggregation_count(mask, agg,
                                                                                horizon))
    metrics = _means(done, "policy", {"clipfrac": "clipfrac_sum",
                                      "dual_clipfrac": "dual_clipfrac_sum",
                                      "approx_kl": "approx_kl_sum", "ratio_mean": "ratio_sum",
                                      "entropy": "entropy_sum"})
    applied = [d for d in done if d.update.applied]  # the loss is a mean over its own count
    metrics["policy/loss"] = (sum(d.sums["loss_sum"] for d in applied)
                              / max(sum(d.sums["count"] for d in applied), 1.0))
    metrics["policy/lr"] = policy.lr
    metrics["policy/skipped_minibatches"] = float(sum(
        d.update.skipped_for == RATIO_THRESHOLD for d in done))
    if rl.is_correction != "none":
        metrics.update(importance_metrics(is_stats))
    return UpdateSummary(metrics, [d.update for d in done])


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
                  returns: torch.Tensor, rl: RLConfig, value_clip_eps: float,
                  data: DataConfig, seed: list[int]) -> UpdateSummary:
    """PPO's clipped value loss toward the GAE returns (docs/algorithm.md §3)."""
    width = rollout.prompt_width

    def loss_for(tokens: float) -> LossFn:
        def loss_fn(outputs, batch):
            # V(s_t) is the output before token t: the last prompt token's, then y_0, y_1, ...
            steps = batch["mask"].shape[1]  # the microbatch's (token-budget ones are cut)
            values = outputs["values"][:, width - 1:width - 1 + steps]
            loss, stats = value_loss_clipped(values, batch["old_values"], batch["returns"],
                                             batch["mask"], value_clip_eps, tokens)
            return loss, {"tokens": stats["tokens"], "loss_sum": loss.detach() * tokens,
                               "clipfrac_sum": stats["clipfrac_sum"]}
        return loss_fn

    done = minibatch_epochs(critic, rollout, {"old_values": old_values, "returns": returns},
                            rl, data, seed, forward.gvm_values_head, loss_for,
                            CRITIC_SUMS)
    return UpdateSummary(_means(done, "critic", {"loss": "loss_sum",
                                                 "clipfrac": "clipfrac_sum"}),
                         [d.update for d in done])
