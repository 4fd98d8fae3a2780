"""The RL job: a policy trained by the clipped update, judged by a scorer (docs/algorithm.md).

``RLAlgorithm`` names what differs between algorithms (which scoring models, which estimator,
whether a reference is needed); ``RLTrainer`` is built from those parts and runs ``rl_step``.
"""

from __future__ import annotations

import time

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from megatron.core import parallel_state

from megatron_dvpo import distributed
from megatron_dvpo.config import ConfigError, RunConfig
from megatron_dvpo.data.prompts import load_prompts
from megatron_dvpo.data.sampler import BatchSource
from megatron_dvpo.data.tokenizer import load_tokenizer
from megatron_dvpo.logging import Dashboard
from megatron_dvpo.models import build_chunks, forward
from megatron_dvpo.models.generation import Rollout, SamplingConfig
from megatron_dvpo.models.guided import ValueGuide
from megatron_dvpo.rl.advantages import AdaptiveKLController, FixedKLController
from megatron_dvpo.rl.dashboard import rl_dashboard
from megatron_dvpo.rl.estimators import check_estimator
from megatron_dvpo.rl.gaming import gaming_warnings, truncated
from megatron_dvpo.rl.inputs import RLInputs, check_rl_inputs
from megatron_dvpo.rl.rewards import RolloutTextScores
from megatron_dvpo.rl.rollout_backend import MegatronSampler
from megatron_dvpo.rl.samples import samples_markdown
from megatron_dvpo.rl.scorers import Scorer, frozen_model
from megatron_dvpo.rl.step import RLParts, rl_step, rollout_seed
from megatron_dvpo.training.loop import StepResult
from megatron_dvpo.training.trained_model import TrainedModel

EVAL_SEED = 10 ** 6  # held-out prompts are sampled alike at every evaluation


@dataclass(frozen=True)
class RLAlgorithm:
    """One algorithm: the config keys of its scoring models, its scorer and estimator."""

    name: str
    value_keys: Callable[[RunConfig], tuple[str, ...]]  # the config keys of its value models
    scorer: Callable[[RunConfig], type]  # the Scorer class this config selects
    make_scorer: Callable[[RunConfig, dict[str, RunConfig], int], Scorer]
    estimator: Callable[[RunConfig], str]
    needs_reference: Callable[[RunConfig], bool]
    whiten_state_values: Callable[[RunConfig], bool] = lambda cfg: False
    prepare: Callable[[RunConfig], None] = lambda cfg: None  # defaults resolved before checks
    check: Callable[[RunConfig], None] = lambda cfg: None  # its own checks, before any work
    # what keeps the scorer in step with the policy (DVPO's GVM refresh), called every step
    make_refresh: Callable[["RLTrainer"], Optional[Callable]] = lambda trainer: None
    # the rollout backend's guide (rollout.guide_beta > 0; DVPO: its GVM), or None: refused
    guide: Optional[Callable[["RLTrainer"], ValueGuide]] = None

    @staticmethod
    def updates_per_step(cfg: RunConfig) -> int:
        return cfg.rl.ppo_epochs * cfg.rl.minibatches

    def check_inputs(self, cfg: RunConfig, overrides: list[str] | tuple = ()) -> RLInputs:
        self.prepare(cfg)
        scorer = self.scorer(cfg)
        check_estimator(self.estimator(cfg), scorer.scores, scorer.__name__)
        if cfg.rollout.guide_beta > 0 and self.guide is None:
            raise ConfigError(f"rollout.guide_beta={cfg.rollout.guide_beta}: {self.name} has "
                              "no value model to guide decoding with")
        self.check(cfg)
        return check_rl_inputs(cfg, overrides, self.value_keys(cfg), self.needs_reference(cfg))

    def build(self, cfg: RunConfig, inputs: RLInputs) -> "RLTrainer":
        return RLTrainer(cfg, self, inputs)

    def __call__(self, cfg: RunConfig) -> "RLTrainer":
        """Checked and built in one (in-process use; the command line checks before any
        process group, then builds)."""
        return self.build(cfg, self.check_inputs(cfg))


class PromptSource:
    """This data-parallel rank's prompts of each step, resumable."""

    def __init__(self, prompts: list, global_batch_size: int, seed: int):
        self.prompts, self.global_batch_size = prompts, global_batch_size
        self.batches = BatchSource(global_batch_size, parallel_state.get_data_parallel_rank(),
                                   parallel_state.get_data_parallel_world_size(), seed)

    def next_batch(self) -> list[list[int]]:
        return [self.prompts[i].ids for i in self.batches.next_indices(len(self.prompts))]


class RLTrainer:
    """The loop's job for an RL algorithm: builds the step's parts once (``RLParts``), feeds
    it prompts, and adds what is the trainer's own (evaluation, true reward, gaming checks)."""

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
        self.kl = (AdaptiveKLController(rl.kl_coef, rl.kl_target, rl.kl_horizon)
                   if rl.kl_adaptive and rl.kl_coef > 0 else FixedKLController(rl.kl_coef))
        limit, skip = cfg.rollout.max_prompt_length, cfg.data.skip_bad_rows
        prompts, counts = load_prompts(cfg.data.train_path, self.tokenizer, limit, skip)
        self.prompts = PromptSource(prompts, cfg.data.global_batch_size, cfg.seed)
        self.eval_prompts = (load_prompts(cfg.data.eval_path, self.tokenizer, limit, skip)[0]
                             if cfg.data.eval_path else None)
        # the true reward, and the refresh's ranking (the same object when it is the true
        # reward's, so that a step's rollout is scored once)
        self.true_reward = (RolloutTextScores(inputs.true_reward, self.tokenizer)
                            if inputs.true_reward else None)
        self.refresh_scores = (RolloutTextScores(inputs.refresh_scorer, self.tokenizer)
                               if inputs.refresh_scorer else self.true_reward)
        rollout = cfg.rollout
        self.sequence_length = rollout.max_prompt_length + rollout.max_new_tokens
        guide = algorithm.guide(self) if rollout.guide_beta > 0 else None
        self.backend = MegatronSampler(
            self.policy.chunks, SamplingConfig(rollout.max_new_tokens, rollout.temperature,
                                               rollout.top_p, rollout.top_k,
                                               rollout.min_new_tokens),
            self.tokenizer.eos_id, self.tokenizer.pad_id, cfg.model.vocab_size, guide)
        self.parts = RLParts(
            cfg, self.policy, self.backend, self.scorer, self.reference,
            check_estimator(algorithm.estimator(cfg), self.scorer.scores,
                            type(self.scorer).__name__),
            self.kl, forward.logit_temperature(rollout.temperature), self.tokenizer.eos_id,
            algorithm.whiten_state_values(cfg), algorithm.make_refresh(self))
        distributed.print_rank0(
            f"{algorithm.name}: {len(prompts)} prompts ({counts}), estimator "
            f"{algorithm.estimator(cfg)}, "
            f"reference {'loaded' if self.reference else 'not loaded'}")

    @property
    def dashboard(self) -> Dashboard:
        return rl_dashboard(self.scorer.final_value_tag, self.cfg.rl.true_reward is not None)

    # -- the loop's job ---------------------------------------------------------------------
    def initialize(self) -> None:
        self.policy.load_weights(self.cfg.rl.policy)
        self.scorer.initialize()

    def state_dict(self) -> dict:
        return {**self.prompts.batches.state_dict(), "kl": self.kl.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.prompts.batches.load_state_dict(state)
        self.kl.load_state_dict(state["kl"])

    def step(self, step: int) -> StepResult:
        prompts = [p for p in self.prompts.next_batch() for _ in range(self.cfg.rollout.n_samples)]
        out = rl_step(self.parts, prompts, step)
        metrics = {**out.metrics, **self.true_reward_metrics(prompts, out.rollout)}
        interval, text = self.cfg.rl.eval_interval, {}
        if interval and (step + 1) % interval == 0:
            evaluated, text = self.evaluate()
            metrics.update(evaluated)
        return StepResult(metrics, out.updates, stop=self.check_gaming(metrics, step + 1),
                          text=text, histograms=out.histograms)

    def start(self, resumed: bool) -> dict[str, float]:
        return {} if resumed else self.evaluate()[0]  # the initial policy's true reward

    def finish(self) -> dict[str, float]:
        interval = self.cfg.rl.eval_interval
        if interval and self.cfg.train_steps % interval == 0:
            return {}  # the last step was just evaluated
        return self.evaluate()[0]

    # -- the trainer's own -------------------------------------------------------------------
    def sample(self, prompts: list[list[int]], step_seed: int) -> Rollout:
        return self.backend.generate(prompts, rollout_seed(step_seed))

    @property
    def frozen_models(self) -> dict[str, list[torch.nn.Module]]:
        """The forward-only models this job holds (for ``memory/*`` metrics)."""
        reference = {"reference": self.reference} if self.reference is not None else {}
        return {**reference, **self.scorer.frozen}

    @property
    def samples_per_step(self) -> int:
        """Responses in a global batch: rollout.n_samples per prompt."""
        return self.prompts.global_batch_size * self.cfg.rollout.n_samples

    def true_reward_metrics(self, prompts: list[list[int]], rollout: Rollout
                            ) -> dict[str, float]:
        if self.true_reward is None:
            return {}
        total = distributed.all_reduce_data_parallel(sum(self.true_reward(prompts, rollout)))
        return {"rollout/true_reward_mean": total / self.samples_per_step}

    def check_gaming(self, metrics: dict[str, float], step: int) -> str | None:
        """A warning line past a gaming threshold; the reason to stop with stop_on_gaming."""
        rl = self.cfg.rl
        found = gaming_warnings(metrics, {
            "rollout/repeat_rate": ("max", rl.gaming_max_repeat_rate),
            "rollout/truncated_rate": ("max", rl.gaming_max_truncated_rate),
            "rollout/gvm_value_ood_rate": ("max", rl.gaming_max_value_ood_rate),
            "rollout/gvm_head_disagree_rate": ("max", rl.gaming_max_head_disagree_rate),
            "policy/entropy": ("min", rl.gaming_min_entropy)})
        if not found:
            return None
        message = f"step {step}: the policy may be gaming its scorer: {'; '.join(found)}"
        distributed.print_rank0(f"warning: {message}")
        return message if rl.stop_on_gaming else None

    def evaluate(self) -> tuple[dict[str, float], dict[str, str]]:
        """Mean true reward, length and truncation rate of sampled responses to the held-out
        prompts, and a few of them as TensorBoard text (``eval/samples``)."""
        if self.true_reward is None or self.eval_prompts is None:
            return {}, {}
        start = time.perf_counter()
        dp_rank = parallel_state.get_data_parallel_rank()
        dp_size = parallel_state.get_data_parallel_world_size()
        mine = [p.ids for p in self.eval_prompts][dp_rank::dp_size]
        rollout = self.sample(mine, EVAL_SEED)
        rewards = self.true_reward(mine, rollout)
        return ({**held_out_metrics(rollout, rewards, len(self.eval_prompts),
                                    self.tokenizer.eos_id, self.cfg.rollout.max_new_tokens),
                 "timing_s/eval": time.perf_counter() - start},
                {"eval/samples": samples_markdown(self.tokenizer, rollout, rewards)})


def held_out_metrics(rollout: Rollout, rewards: list[float], prompts: int, eos_id: int,
                     max_new_tokens: int) -> dict[str, float]:
    """The held-out responses' mean true reward, length and truncation rate over the
    data-parallel ranks (``prompts`` in all: ranks may hold one prompt more or less)."""
    cut = truncated(rollout.responses, rollout.response_lengths, eos_id, max_new_tokens)
    totals = torch.tensor([sum(rewards), float(rollout.response_lengths.sum()),
                           float(cut.sum())], dtype=torch.float64, device=distributed.device())
    torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    reward, length, cut_rows = (total / prompts for total in totals.tolist())
    return {"eval/true_reward_mean": reward, "eval/response_len_mean": length,
            "eval/truncated_rate": cut_rows}
