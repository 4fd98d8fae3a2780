"""The RL job: a policy trained by the clipped update, judged by a scorer (docs/algorithm.md).

``RLAlgorithm`` names what differs between algorithms (which scoring models, which estimator,
whether a reference is needed); ``RLTrainer`` is built from those parts and runs ``rl_step``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from megatron.core import parallel_state

from megatron_dvpo import distributed
from megatron_dvpo.config import ConfigError, RunConfig
from megatron_dvpo.data.prompts import load_prompts
from megatron_dvpo.data.sampler import BatchSource
from megatron_dvpo.data.tokenizer import load_tokenizer
from megatron_dvpo.models import build_chunks, forward
from megatron_dvpo.models.generation import (Rollout, SamplingConfig, generate,
                                              rollout_responses)
from megatron_dvpo.models.guided import GuideConfig, ValueGuide
from megatron_dvpo.rl.advantages import AdaptiveKLController, FixedKLController
from megatron_dvpo.rl.gaming import gaming_warnings
from megatron_dvpo.rl.inputs import RLInputs, check_rl_inputs
from megatron_dvpo.rl.rewards import TrueReward, load_scorer, score_texts
from megatron_dvpo.rl.scorers import Scorer, frozen_model
from megatron_dvpo.rl.step import rl_step
from megatron_dvpo.rl.updates import UpdateSummary, update_policy
from megatron_dvpo.training.loop import StepResult
from megatron_dvpo.training.trained_model import TrainedModel

EVAL_SEED = 10 ** 6  # held-out prompts are sampled alike at every evaluation


@dataclass(frozen=True)
class RLAlgorithm:
    """One algorithm: the config keys of its scoring models, its scorer and estimator."""

    name: str
    value_keys: Callable[[RunConfig], tuple[str, ...]]  # the config keys of its value models
    make_scorer: Callable[[RunConfig, dict[str, RunConfig], int], Scorer]
    estimator: Callable[[RunConfig], str]
    needs_reference: Callable[[RunConfig], bool]
    whiten_state_values: Callable[[RunConfig], bool] = lambda cfg: False
    prepare: Callable[[RunConfig], None] = lambda cfg: None  # defaults resolved before checks
    # what keeps the scorer in step with the policy (DVPO's GVM refresh), called every step
    make_refresh: Callable[["RLTrainer"], Optional[Callable]] = lambda job: None

    @staticmethod
    def updates_per_step(cfg: RunConfig) -> int:
        return cfg.rl.ppo_epochs * cfg.rl.minibatches

    def check_inputs(self, cfg: RunConfig, overrides: list[str] | tuple = ()) -> RLInputs:
        self.prepare(cfg)
        if cfg.rollout.guide_beta > 0:
            if "dvpo.gvm" not in self.value_keys(cfg):
                raise ConfigError(f"rollout.guide_beta steers sampling by DVPO's GVM; "
                                  f"{self.name} has none")
            if (cfg.dvpo.refresh_interval or cfg.dvpo.gvm_offload
                    or cfg.parallel.pipeline_model_parallel_size > 1):
                raise ConfigError("rollout.guide_beta: GVM-guided decoding needs a frozen GVM "
                                  "on the device (dvpo.refresh_interval=0, "
                                  "dvpo.gvm_offload=false) and "
                                  "parallel.pipeline_model_parallel_size=1")
        return check_rl_inputs(cfg, overrides, self.value_keys(cfg), self.needs_reference(cfg))

    def __call__(self, cfg: RunConfig) -> "RLTrainer":
        return RLTrainer(cfg, self, self.check_inputs(cfg))


class PromptSource:
    """This data-parallel rank's prompts of each step, resumable."""

    def __init__(self, prompts: list, global_batch_size: int, seed: int):
        self.prompts, self.global_batch_size = prompts, global_batch_size
        self.batches = BatchSource(global_batch_size, parallel_state.get_data_parallel_rank(),
                                   parallel_state.get_data_parallel_world_size(), seed)

    def next_batch(self) -> list[list[int]]:
        return [self.prompts[i].ids for i in self.batches.next_indices(len(self.prompts))]


class RLTrainer:

    def __init__(self, cfg: RunConfig, algorithm: RLAlgorithm, inputs: RLInputs):
        self.cfg, self.algorithm, rl = cfg, algorithm, cfg.rl
        cfg.data.tokenizer = str(inputs.tokenizer)
        self.tokenizer = load_tokenizer(inputs.tokenizer)
        total = cfg.train_steps * algorithm.updates_per_step(cfg)
        self.policy = TrainedModel(build_chunks(cfg, initialize=False), cfg.optimizer,
                                   cfg.parallel, cfg.precision, total,
                                   cfg.checkpoint.override_scheduler)
        self.scorer = algorithm.make_scorer(cfg, inputs.value_models, total)
        self.summary_tags = ("policy/loss", self.scorer.final_value_tag, "eval/true_reward_mean",
                             "rollout/response_len_mean", "policy/approx_kl")
        self.units = {"model": self.policy, **self.scorer.units}
        self.reference = (frozen_model(cfg, cfg.model, rl.reference or rl.policy)
                          if algorithm.needs_reference(cfg) else None)
        self.estimator = algorithm.estimator(cfg)
        self.whiten_state_values = algorithm.whiten_state_values(cfg)
        self.kl = (AdaptiveKLController(rl.kl_coef, rl.kl_target, rl.kl_horizon)
                   if rl.kl_adaptive and rl.kl_coef > 0 else FixedKLController(rl.kl_coef))
        limit, skip = cfg.rollout.max_prompt_length, cfg.data.skip_bad_rows
        prompts, counts = load_prompts(cfg.data.train_path, self.tokenizer, limit, skip)
        self.prompts = PromptSource(prompts, cfg.data.global_batch_size, cfg.seed)
        self.eval_prompts = (load_prompts(cfg.data.eval_path, self.tokenizer, limit, skip)[0]
                             if cfg.data.eval_path else None)
        self.true_reward = load_scorer(rl.true_reward)
        self.refresh = algorithm.make_refresh(self)
        self.sequence_length = cfg.rollout.max_prompt_length + cfg.rollout.max_new_tokens
        self.sampling = SamplingConfig(cfg.rollout.max_new_tokens, cfg.rollout.temperature,
                                       cfg.rollout.top_p, cfg.rollout.top_k)
        # logp_old, logp and logp_ref all come from the distribution the rollout samples from
        self.temperature = forward.logit_temperature(cfg.rollout.temperature)
        distributed.print_rank0(
            f"{algorithm.name}: {len(prompts)} prompts ({counts}), estimator {self.estimator}, "
            f"reference {'loaded' if self.reference else 'not loaded'}")

    # -- the loop's job ---------------------------------------------------------------------
    def initialize(self) -> None:
        self.policy.load_weights(self.cfg.rl.policy)
        if hasattr(self.scorer, "initialize"):
            self.scorer.initialize()

    def state_dict(self) -> dict:
        return {**self.prompts.batches.state_dict(), "kl": self.kl.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.prompts.batches.load_state_dict(state)
        self.kl.load_state_dict(state["kl"])

    def step(self, step: int) -> StepResult:
        return rl_step(self, step)

    def start(self, resumed: bool) -> dict[str, float]:
        return {} if resumed else self.evaluate()  # the initial policy's true reward

    def finish(self) -> dict[str, float]:
        interval = self.cfg.rl.eval_interval
        if interval and self.cfg.train_steps % interval == 0:
            return {}  # the last step was just evaluated
        return self.evaluate()

    # -- what rl_step uses ------------------------------------------------------------------
    def rollout(self, prompts: list[list[int]], step_seed: int) -> Rollout:
        seed = step_seed * 1009 + parallel_state.get_data_parallel_rank()
        rollout = self.cfg.rollout
        guide = (ValueGuide(self.scorer.gvm, GuideConfig(rollout.guide_beta, rollout.guide_top_k))
                 if rollout.guide_beta > 0 else None)
        return generate(self.policy.chunks, prompts, self.sampling, self.tokenizer.eos_id,
                        self.tokenizer.pad_id, self.cfg.model.vocab_size, seed, guide)

    def update_policy(self, rollout: Rollout, logp_old: torch.Tensor, advantages: torch.Tensor,
                      seed: list[int]) -> UpdateSummary:
        return update_policy(self.policy, rollout, logp_old, advantages, self.cfg.rl,
                             self.cfg.data, self.cfg.model.vocab_size,
                             self.temperature, seed, self.cfg.rollout.max_new_tokens)

    def perf_metrics(self, rollout: Rollout, gen_s: float, score_s: float,
                     train_s: float) -> dict[str, float]:
        mask = rollout.response_mask
        gen_tokens = distributed.all_reduce_data_parallel(float(mask.sum()))
        seq_tokens = distributed.all_reduce_data_parallel(float(
            (rollout.prompt_width - rollout.prompt_pad + rollout.response_lengths).sum()))
        return {"perf/gen_tokens_per_s": gen_tokens / gen_s,
                "perf/train_tokens_per_s": seq_tokens * self.cfg.rl.ppo_epochs / train_s,
                "perf/gen_time_s": gen_s, "perf/score_time_s": score_s,
                "perf/train_time_s": train_s}

    @property
    def frozen_models(self) -> dict[str, list[torch.nn.Module]]:
        """The forward-only models this job holds (for ``memory/*`` metrics)."""
        reference = {"reference": self.reference} if self.reference is not None else {}
        return {**reference, **self.scorer.frozen}

    @property
    def samples_per_step(self) -> int:
        """Responses in a global batch: rollout.n_samples per prompt."""
        return self.prompts.global_batch_size * self.cfg.rollout.n_samples

    def true_reward_metrics(self, prompts: list[list[int]], rollout: Rollout,
                            step: int) -> dict[str, float]:
        metrics = {}
        if self.true_reward is not None:
            total = distributed.all_reduce_data_parallel(
                sum(self.text_scores(self.true_reward, prompts, rollout)))
            metrics["rollout/true_reward_mean"] = total / self.samples_per_step
        interval = self.cfg.rl.eval_interval
        if interval and (step + 1) % interval == 0:
            metrics.update(self.evaluate())
        return metrics

    def check_gaming(self, metrics: dict[str, float], step: int) -> str | None:
        """A warning line past a gaming threshold; the reason to stop with stop_on_gaming."""
        rl = self.cfg.rl
        found = gaming_warnings(metrics, {
            "rollout/repeat_rate": ("max", rl.gaming_max_repeat_rate),
            "rollout/truncated_rate": ("max", rl.gaming_max_truncated_rate),
            "rollout/gvm_value_ood_rate": ("max", rl.gaming_max_value_ood_rate),
            "policy/entropy": ("min", rl.gaming_min_entropy)})
        if not found:
            return None
        message = f"step {step}: the policy may be gaming its scorer: {'; '.join(found)}"
        distributed.print_rank0(f"warning: {message}")
        return message if rl.stop_on_gaming else None

    def text_scores(self, scorer: TrueReward, prompts: list[list[int]],
                    rollout: Rollout) -> list[float]:
        """``scorer`` on each (prompt, response) as text, the response without its EOS."""
        return score_texts(scorer, self.tokenizer, prompts, rollout_responses(rollout))

    def evaluate(self) -> dict[str, float]:
        """Mean true reward of sampled responses to the held-out prompts."""
        if self.true_reward is None or self.eval_prompts is None:
            return {}
        dp_rank = parallel_state.get_data_parallel_rank()
        dp_size = parallel_state.get_data_parallel_world_size()
        mine = [p.ids for p in self.eval_prompts][dp_rank::dp_size]
        rollout = self.rollout(mine, EVAL_SEED)
        total = distributed.all_reduce_data_parallel(
            sum(self.text_scores(self.true_reward, mine, rollout)))
        return {"eval/true_reward_mean": total / len(self.eval_prompts)}
