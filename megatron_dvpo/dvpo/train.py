"""DVPO policy training: rollout -> frozen colocated GVM -> advantages -> clipped PPO update.

    torchrun --nproc-per-node N -m megatron_dvpo.dvpo.train --config examples/dvpo_tiny.yaml

Each step (docs/algorithm.md §2): sample one response per prompt from the policy; score it with one
forward pass of the frozen Global Value Model, which lives on the same ranks, never trains and
has no optimizer or DDP wrapper; optionally add a KL penalty against a frozen reference (loaded
only when ``dvpo.kl_coef > 0``); turn values into advantages; and run ``ppo_epochs`` passes of
the clipped policy loss. No critic is trained and no reward model is run.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from megatron.core import parallel_state

from megatron_dvpo import distributed
from megatron_dvpo.checkpointing import load_model
from megatron_dvpo.config import ConfigError, ModelConfig, RunConfig, validate
from megatron_dvpo.data.prompts import load_prompts
from megatron_dvpo.data.tokenizer import load_tokenizer
from megatron_dvpo.dvpo.advantages import (AdaptiveKLController, FixedKLController,
                                           compute_advantages, masked_moments,
                                           whiten_with_moments)
from megatron_dvpo.dvpo.inputs import RLInputs, check_rl_inputs
from megatron_dvpo.dvpo.scoring import estimator_inputs, rollout_q_view
from megatron_dvpo.dvpo.losses import entropy_bonus, ppo_policy_loss, should_skip_minibatch
from megatron_dvpo.models import build_chunks, forward
from megatron_dvpo.models.generation import Rollout, SamplingConfig, generate
from megatron_dvpo.models.precision import inference_precision
from megatron_dvpo.training import Trainer, run_trainer

UPDATE_SUMS = ["tokens", "loss_sum", "clipfrac_sum", "approx_kl_sum", "ratio_sum",
               "entropy_sum"]


def frozen_model(cfg: RunConfig, model: ModelConfig, directory: str) -> list[torch.nn.Module]:
    """A forward-only model at this run's layout, in bf16 even when the policy trains in FP8:
    no gradients, no optimizer, no DDP."""
    frozen_cfg = RunConfig(model=model, parallel=cfg.parallel,
                           precision=inference_precision(cfg.precision), seed=cfg.seed)
    chunks = build_chunks(frozen_cfg, initialize=False)
    load_model(chunks, Path(directory) / "model")
    for chunk in chunks:
        chunk.eval()
        chunk.requires_grad_(False)
    return chunks


class DVPOTrainer(Trainer):
    summary_tags = ("policy/loss", "rollout/gvm_final_value_mean", "eval/true_reward_mean",
                    "rollout/response_len_mean", "policy/approx_kl")
    value_keys: tuple[str, ...] = ("dvpo.gvm",)  # the config keys of the scoring models

    @staticmethod
    def updates_per_step(cfg: RunConfig) -> int:
        return cfg.dvpo.ppo_epochs * cfg.dvpo.minibatches

    @classmethod
    def check_inputs(cls, cfg: RunConfig, overrides: list[str] | tuple = ()) -> RLInputs:
        return check_rl_inputs(cfg, overrides, cls.value_keys, cls.needs_reference(cfg))

    def build_scorers(self, cfg: RunConfig, value_cfgs: dict[str, RunConfig]) -> None:
        self.gvm = frozen_model(cfg, value_cfgs["dvpo.gvm"].model, cfg.dvpo.gvm)
        self.gvm_alignment = value_cfgs["dvpo.gvm"].gvm.alignment  # how to read its outputs

    @staticmethod
    def needs_reference(cfg: RunConfig) -> bool:
        return cfg.dvpo.kl_coef > 0

    def __init__(self, cfg: RunConfig):
        inputs = self.check_inputs(cfg)
        value_cfgs, tokenizer_path = inputs.value_models, inputs.tokenizer
        validate(cfg, torch.distributed.get_world_size())
        self.tokenizer = load_tokenizer(str(tokenizer_path))
        cfg.data.tokenizer = str(tokenizer_path)
        dvpo = cfg.dvpo
        chunks = build_chunks(cfg, initialize=False)
        load_model(chunks, Path(dvpo.policy) / "model")
        super().__init__(cfg, chunks)
        self.build_scorers(cfg, value_cfgs)
        self.reference = (frozen_model(cfg, cfg.model, dvpo.reference or dvpo.policy)
                          if self.needs_reference(cfg) else None)
        self.kl = (AdaptiveKLController(dvpo.kl_coef, dvpo.kl_target, dvpo.kl_horizon)
                   if dvpo.kl_adaptive and dvpo.kl_coef > 0 else FixedKLController(dvpo.kl_coef))
        limit = cfg.rollout.max_prompt_length
        self.prompts, self.prompt_counts = load_prompts(cfg.data.train_path, self.tokenizer,
                                                        limit, cfg.data.skip_bad_rows)
        self.eval_prompts = (load_prompts(cfg.data.eval_path, self.tokenizer, limit,
                                          cfg.data.skip_bad_rows)[0]
                             if cfg.data.eval_path else None)
        self.scorer = self._true_reward_scorer(dvpo.true_reward)
        self.sampling = SamplingConfig(cfg.rollout.max_new_tokens, cfg.rollout.temperature,
                                       cfg.rollout.top_p, cfg.rollout.top_k)
        # logp_old, logp and logp_ref all come from the distribution the rollout samples from
        self.temperature = forward.logit_temperature(cfg.rollout.temperature)
        distributed.print_rank0(
            f"DVPO: {len(self.prompts)} prompts ({self.prompt_counts}), estimator "
            f"{dvpo.estimator}, reference {'loaded' if self.reference else 'not loaded'}")

    @staticmethod
    def _true_reward_scorer(spec: str | None):
        if not spec:
            return None
        kind, _, seed = spec.partition(":")
        if kind != "synthetic" or not seed.isdigit():
            raise ConfigError(f"dvpo.true_reward={spec!r}: expected 'synthetic:<rule seed>'")
        from megatron_dvpo.data.synthetic import SyntheticRule

        return SyntheticRule(seed=int(seed)).score

    # -- state ------------------------------------------------------------------------------
    def extra_state(self) -> dict:
        return {**super().extra_state(), "kl": self.kl.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        self.kl.load_state_dict(state["kl"])

    # -- pieces of a step ---------------------------------------------------------------------
    def _next_prompts(self) -> list[list[int]]:
        return [self.prompts[i].ids for i in self.next_indices(len(self.prompts))]

    def _rollout(self, prompts: list[list[int]], step_seed: int) -> Rollout:
        seed = step_seed * 1009 + parallel_state.get_data_parallel_rank()
        return generate(self.chunks, prompts, self.sampling, self.tokenizer.eos_id,
                        self.tokenizer.pad_id, self.cfg.model.vocab_size, seed)

    def _true_rewards(self, prompts: list[list[int]], rollout: Rollout) -> list[float]:
        rewards = []
        for prompt, response, length in zip(prompts, rollout.responses,
                                            rollout.response_lengths.tolist()):
            text = self.tokenizer.decode([t for t in response[:length].tolist()
                                          if t != self.tokenizer.eos_id])
            rewards.append(self.scorer(self.tokenizer.decode(prompt), text))
        return rewards

    # What scores a rollout is the one place DVPO and the PPO baseline differ: here one
    # forward pass of the frozen GVM; PPO overrides ``_score``/``_advantages``/``_after_update``.
    def _score(self, rollout: Rollout) -> dict:
        """GVM outputs and reference log-probs (last stage), the GVM back on CPU after if asked."""
        mbs = self.cfg.data.micro_batch_size
        if self.cfg.dvpo.gvm_offload and torch.cuda.is_available():
            for chunk in self.gvm:
                chunk.cuda()
        values = forward.rollout_values(self.gvm, rollout, mbs)
        if self.cfg.dvpo.gvm_offload and torch.cuda.is_available():
            for chunk in self.gvm:
                chunk.cpu()
        return {"values": values, "logp_ref": self._reference_logprobs(rollout)}

    def _reference_logprobs(self, rollout: Rollout):
        if self.reference is None:
            return None
        return forward.response_logprobs(self.reference, rollout, self.cfg.model.vocab_size,
                                         self.cfg.data.micro_batch_size, self.temperature)

    def _advantages(self, rollout: Rollout, scores: dict, logp_old):
        """(advantages, each row's predicted final reward) on the last stage."""
        dvpo, lengths = self.cfg.dvpo, rollout.response_lengths
        width, alignment = rollout.prompt_width, self.gvm_alignment
        q, q_prompt = estimator_inputs(scores["values"], width, lengths, alignment,
                                       dvpo.estimator, dvpo.value_whitening,
                                       self.cfg.data.micro_batch_size)
        advantages, _ = compute_advantages(
            dvpo.estimator, q, q_prompt, rollout.response_mask, logp_old, scores["logp_ref"],
            self.kl.beta, dvpo.gamma, dvpo.lam,
            whiten_values=dvpo.value_whitening == "per_sequence_states")
        q, _ = rollout_q_view(scores["values"], width, lengths, alignment)  # unwhitened
        return advantages, q.gather(1, (lengths - 1)[:, None]).squeeze(1)

    def _after_update(self, rollout: Rollout, scores: dict, step_seed: int) -> dict:
        """Extra training after the policy update (PPO's critic); DVPO trains nothing else."""
        return {}

    def _whiten(self, advantages, mask):
        """Over all response tokens of the global batch."""
        moments = torch.stack([m.double() for m in masked_moments(advantages, mask)])
        torch.distributed.all_reduce(moments, group=parallel_state.get_data_parallel_group())
        return whiten_with_moments(advantages, mask, *moments.unbind())

    def _update(self, rollout: Rollout, logp_old, advantages, step_seed: int) -> dict:
        """``ppo_epochs`` passes over shuffled minibatches of the rollout."""
        dvpo, mbs = self.cfg.dvpo, self.cfg.data.micro_batch_size
        rows = rollout.tokens.shape[0]
        if rows % (dvpo.minibatches * mbs):
            raise ConfigError(f"{rows} rollouts per data-parallel rank do not split into "
                              f"dvpo.minibatches={dvpo.minibatches} of whole microbatches of "
                              f"data.micro_batch_size={mbs}")
        width, steps = rollout.prompt_width, rollout.response_mask.shape[1]
        vocab = self.cfg.model.vocab_size
        mask_full = rollout.attention_mask().expand(-1, -1, rollout.tokens.shape[1], -1)
        mask = rollout.response_mask

        # the entropy is logged always, and differentiated only for the entropy bonus
        head = forward.policy_logprobs_head(vocab, self.temperature, entropy=True,
                                            entropy_grad=dvpo.entropy_coef > 0)

        totals = {k: 0.0 for k in UPDATE_SUMS}
        grad_norms, skipped, generator = [], 0, np.random.default_rng([self.cfg.seed, step_seed])
        dp = parallel_state.get_data_parallel_world_size()
        for _ in range(dvpo.ppo_epochs):
            for rows_mb in np.array_split(generator.permutation(rows), dvpo.minibatches):
                index = torch.as_tensor(rows_mb)
                tokens = distributed.all_reduce_data_parallel(float(mask[index].sum()))

                def loss_fn(outputs, batch):
                    m = batch["mask"]
                    logp = outputs["logprobs"][:, width - 1:width - 1 + steps]
                    entropy = outputs["entropy"][:, width - 1:width - 1 + steps]
                    loss, stats = ppo_policy_loss(logp, batch["logp_old"], batch["advantages"],
                                                  m, dvpo.clip_eps, normalizer=tokens)
                    if dvpo.entropy_coef > 0:
                        loss = loss + entropy_bonus(entropy, m, dvpo.entropy_coef, tokens)
                    sums = {"tokens": stats["tokens"], "loss_sum": loss.detach() * tokens,
                            "clipfrac_sum": stats["clipfrac_sum"],
                            "approx_kl_sum": stats["approx_kl_sum"],
                            "ratio_sum": stats["ratio_sum"],
                            "entropy_sum": (entropy.detach() * m).sum()}
                    return loss * dp, sums

                microbatches = forward.make_microbatches(
                    mbs, tokens=rollout.tokens[index], attention_mask=mask_full[index],
                    logp_old=logp_old[index], advantages=advantages[index], mask=mask[index])
                outputs = self.forward_backward(microbatches, head, loss_fn)
                local = ({k: sum(float(o[k]) for o in outputs) for k in UPDATE_SUMS}
                         if outputs else None)
                sums = distributed.sum_over_replicas(UPDATE_SUMS, local)
                if should_skip_minibatch(sums["ratio_sum"] / sums["tokens"],
                                         dvpo.ratio_threshold):
                    skipped += 1
                    continue
                grad_norm, _ = self.optimizer_step()
                grad_norms.append(grad_norm)
                for k in UPDATE_SUMS:
                    totals[k] += sums[k]
        n = max(totals["tokens"], 1.0)
        return {"policy/loss": totals["loss_sum"] / n,
                "policy/clipfrac": totals["clipfrac_sum"] / n,
                "policy/approx_kl": totals["approx_kl_sum"] / n,
                "policy/ratio_mean": totals["ratio_sum"] / n,
                "policy/entropy": totals["entropy_sum"] / n,
                "policy/grad_norm": float(np.mean(grad_norms)) if grad_norms else 0.0,
                "policy/lr": self.optimizer.param_groups[0]["lr"],
                "policy/skipped_minibatches": float(skipped)}

    # -- the step -----------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        step_seed = self.step + 1
        prompts = self._next_prompts()
        start = time.perf_counter()
        rollout = self._rollout(prompts, step_seed)
        generated = time.perf_counter()
        scores = self._score(rollout)
        scored = time.perf_counter()
        vocab, mbs = self.cfg.model.vocab_size, self.cfg.data.micro_batch_size
        logp_old = forward.response_logprobs(self.chunks, rollout, vocab, mbs, self.temperature)
        on_last = logp_old is not None
        mask = rollout.response_mask
        shape = mask.shape
        if on_last:
            advantages, final = self._advantages(rollout, scores, logp_old)
            if self.cfg.dvpo.whiten_advantages:
                advantages = self._whiten(advantages, mask)
            logp_ref = scores["logp_ref"]
            kl = (logp_old - logp_ref) * mask if logp_ref is not None else torch.zeros(shape)
            local = {"tokens": float(mask.sum()), "rows": float(shape[0]),
                     "kl_sum": float(kl.sum()), "final_value_sum": float(final.sum()),
                     "adv_sum": float((advantages * mask).sum()),
                     "adv_sq_sum": float((advantages ** 2 * mask).sum()),
                     # rollout (bf16) vs training numerics (FP8 when precision.fp8 is set)
                     "logprob_diff_sum": float(((logp_old - rollout.logprobs).abs()
                                                * mask).sum())}
        else:
            advantages = logp_old = torch.zeros(shape)
            local = None
        keys = ["tokens", "rows", "kl_sum", "final_value_sum", "adv_sum", "adv_sq_sum",
                "logprob_diff_sum"]
        rollout_sums = distributed.sum_over_replicas(keys, local)
        metrics = self._update(rollout, logp_old, advantages, step_seed)
        metrics.update(self._after_update(rollout, scores, step_seed))
        trained = time.perf_counter()

        tokens, rows = rollout_sums["tokens"], rollout_sums["rows"]
        # The controller's target is per sequence (docs/algorithm.md §2, step 6): feed
        # it the mean over sequences of the summed per-token KL, never the per-token mean.
        kl_per_sequence = rollout_sums["kl_sum"] / rows
        self.kl.update(kl_per_sequence, int(rows))
        adv_mean = rollout_sums["adv_sum"] / tokens
        gen_tokens = distributed.all_reduce_data_parallel(float(mask.sum()))
        seq_tokens = distributed.all_reduce_data_parallel(float(
            (rollout.prompt_width - rollout.prompt_pad + rollout.response_lengths).sum()))
        metrics.update({
            "rollout/response_len_mean": tokens / rows,
            "rollout/gvm_final_value_mean": rollout_sums["final_value_sum"] / rows,
            "rollout/kl_ref": kl_per_sequence,
            "rollout/kl_ref_per_token": rollout_sums["kl_sum"] / tokens,
            "rollout/beta": self.kl.beta,
            "rollout/adv_mean": adv_mean,
            "rollout/adv_std": max(rollout_sums["adv_sq_sum"] / tokens - adv_mean ** 2, 0) ** 0.5,
            "rollout/logprob_diff": rollout_sums["logprob_diff_sum"] / tokens,
            "perf/gen_tokens_per_s": gen_tokens / (generated - start),
            "perf/train_tokens_per_s": (seq_tokens * self.cfg.dvpo.ppo_epochs
                                        / (trained - scored)),
            "perf/gen_time_s": generated - start,
            "perf/score_time_s": scored - generated,
            "perf/train_time_s": trained - scored,
        })
        if self.scorer is not None:
            true = sum(self._true_rewards(prompts, rollout))
            metrics["rollout/true_reward_mean"] = (
                distributed.all_reduce_data_parallel(true) / (rows or 1))
        interval = self.cfg.dvpo.eval_interval
        if interval and (self.step + 1) % interval == 0:
            metrics.update(self.evaluate())
        return metrics

    def evaluate(self) -> dict[str, float]:
        """Mean true (hidden-rule) reward of sampled responses to the held-out prompts."""
        if self.scorer is None or self.eval_prompts is None:
            return {}
        dp_rank = parallel_state.get_data_parallel_rank()
        dp_size = parallel_state.get_data_parallel_world_size()
        mine = [p.ids for p in self.eval_prompts][dp_rank::dp_size]
        rollout = self._rollout(mine, step_seed=10 ** 6)  # the same samples every evaluation
        total = distributed.all_reduce_data_parallel(sum(self._true_rewards(mine, rollout)))
        return {"eval/true_reward_mean": total / len(self.eval_prompts)}

    def start(self, resumed: bool) -> None:
        if not resumed:  # the initial policy's true reward, for comparison
            before = self.evaluate()
            if before:
                self.logger.log(0, before, ("eval/true_reward_mean",))

    def finish(self) -> None:
        interval = self.cfg.dvpo.eval_interval
        if interval and self.step % interval == 0:
            return  # the last step was just evaluated
        after = self.evaluate()
        if after:
            self.logger.log(self.step, after, ("eval/true_reward_mean",))


def main(argv=None) -> None:
    run_trainer(DVPOTrainer, __doc__.splitlines()[0], argv, DVPOTrainer.check_inputs)

if __name__ == "__main__":
    main()
