"""Scorers: what judges a rollout. One small protocol, four implementations.

- ``GVMScorer`` (DVPO): one forward pass of the frozen Global Value Model.
- ``RewardCriticScorer`` (the PPO baseline): a frozen reward model for the final reward and a
  critic for ``V(s_t)``, trained online after each policy update.
- ``RewardModelScorer`` (GRPO, RLOO): the frozen reward model alone.
- ``TextScorer`` (GRPO, RLOO with ``grpo.scorer``): the user's function of the text.

``score`` returns ``Scores`` on every pipeline stage (per-token outputs are made on the last
stage and broadcast once), so the RL step has no branch on the stage. ``learn`` trains what the
scorer trains (nothing for the GVM), and ``units`` are those trained models, checkpointed with
the policy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Protocol

import torch
from megatron.core.utils import get_attr_wrapped_model

from megatron_dvpo import distributed
from megatron_dvpo.checkpointing import load_model
from megatron_dvpo.config import ModelConfig, RunConfig
from megatron_dvpo.models import build_chunks, forward
from megatron_dvpo.data.tokenizer import load_tokenizer
from megatron_dvpo.device import device
from megatron_dvpo.gvm.heads import mean_value, read_heads
from megatron_dvpo.integrity import require_intact
from megatron_dvpo.models.generation import Rollout, rollout_prompts, rollout_responses
from megatron_dvpo.models.precision import inference_precision
from megatron_dvpo.rl.estimators import (Advantages, CriticScores, GVMScores, Scores,
                                         SequenceScores)
from megatron_dvpo.rl.gaming import flat_value_range, out_of_range
from megatron_dvpo.rl.refresh import refresh_optimizer, refresh_updates_total
from megatron_dvpo.rl.rewards import load_scorer, score_texts
from megatron_dvpo.rl.scoring import (reads_released_whitening, released_whitened_q_view,
                                      rollout_q_view)
from megatron_dvpo.rl.updates import UpdateSummary, update_critic
from megatron_dvpo.training.trained_model import TrainedModel


class Scorer(Protocol):
    units: dict[str, TrainedModel]
    frozen: dict[str, list[torch.nn.Module]]  # forward-only models, by name
    # the tag of the mean of Scores.final_value: it names the model (or function) behind it
    final_value_tag: str
    scores: type[Scores]  # what score gives, checked against what the estimator reads

    def initialize(self) -> None: ...  # loads what the scorer trains

    def score(self, rollout: Rollout) -> Scores: ...

    def learn(self, rollout: Rollout, scores: Scores, advantages: Advantages,
              seed: list[int]) -> Optional[UpdateSummary]: ...


def frozen_model(cfg: RunConfig, model: ModelConfig, directory: str) -> list[torch.nn.Module]:
    """A forward-only model at this run's layout, in bf16 even when the policy trains in FP8:
    no gradients, no optimizer, no DDP."""
    frozen_cfg = RunConfig(model=model, parallel=cfg.parallel,
                           precision=inference_precision(cfg.precision), seed=cfg.seed)
    chunks = build_chunks(frozen_cfg, initialize=False)
    require_intact(directory, ("model",))
    load_model(chunks, Path(directory) / "model")
    for chunk in chunks:
        chunk.eval()
        chunk.requires_grad_(False)
    return chunks


def rollout_values(chunks, rollout: Rollout, micro_batch_size: int) -> torch.Tensor:
    """A value model's ``[B, P+T]`` outputs over a rollout (``[B, P+T, K]`` with K heads), on
    every pipeline stage."""
    values = forward.rollout_values(chunks, rollout, micro_batch_size)
    heads = get_attr_wrapped_model(chunks[-1], "value_heads")
    return distributed.broadcast_from_last_stage(
        values, tuple(rollout.tokens.shape) + ((heads,) if heads > 1 else ()), torch.float32)


def sequence_rewards(reward_model, rollout: Rollout, micro_batch_size: int) -> torch.Tensor:
    """[B] a Bradley-Terry reward model's score of each response: its last token's value (its
    heads' mean)."""
    lengths = rollout.response_lengths
    q, _ = rollout_q_view(mean_value(rollout_values(reward_model, rollout, micro_batch_size)),
                          rollout.prompt_width, lengths)
    return q.gather(1, (lengths - 1)[:, None]).squeeze(1)


class RewardModelScorer:
    """GRPO's and RLOO's: a frozen reward model's sequence reward, nothing trained."""

    final_value_tag = "rollout/reward_model_score_mean"
    scores = SequenceScores

    def __init__(self, cfg: RunConfig, reward_cfg: RunConfig, directory: str):
        self.units: dict[str, TrainedModel] = {}
        self.micro_batch_size = cfg.data.micro_batch_size
        self.reward_model = frozen_model(cfg, reward_cfg.model, directory)
        self.frozen = {"reward_model": self.reward_model}

    def score(self, rollout: Rollout) -> Scores:
        reward = sequence_rewards(self.reward_model, rollout, self.micro_batch_size)
        return SequenceScores(final_value=reward, rewards=reward)

    def initialize(self) -> None:
        return None

    def learn(self, rollout, scores, advantages, seed) -> None:
        return None


class TextScorer:
    """GRPO's and RLOO's with ``grpo.scorer``: the user's function of (prompt, response) text
    (a verifier, a rule) as each response's reward; no model. Every rank of a model-parallel
    group holds the same rollout and scores it alike."""

    final_value_tag = "rollout/scorer_reward_mean"
    scores = SequenceScores

    def __init__(self, cfg: RunConfig):
        self.units: dict[str, TrainedModel] = {}
        self.frozen: dict[str, list[torch.nn.Module]] = {}
        self.scorer = load_scorer(cfg.grpo.scorer, "grpo.scorer")
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)

    def score(self, rollout: Rollout) -> Scores:
        reward = torch.tensor(score_texts(self.scorer, self.tokenizer, rollout_prompts(rollout),
                                          rollout_responses(rollout)),
                              dtype=torch.float32, device=device())
        return SequenceScores(final_value=reward, rewards=reward)

    def initialize(self) -> None:
        return None

    def learn(self, rollout, scores, advantages, seed) -> None:
        return None


class GVMScorer:
    """The frozen GVM, read as it was trained (``alignment``) and as the estimator needs
    (``value_whitening`` for gae; docs/algorithm.md §1-2). With ``dvpo.refresh_interval`` it
    is a trained model instead (``rl/refresh.py`` trains it), checkpointed as the unit ``gvm``."""

    final_value_tag = "rollout/gvm_final_value_mean"  # q_{T-1}
    scores = GVMScores

    def __init__(self, cfg: RunConfig, gvm_cfg: RunConfig):
        self.cfg, self.gvm_cfg = cfg, gvm_cfg
        self.model: TrainedModel | None = None
        self.units: dict[str, TrainedModel] = {}
        if cfg.dvpo.refresh_interval:
            gvm_run = RunConfig(model=gvm_cfg.model, parallel=cfg.parallel,
                                precision=inference_precision(cfg.precision),
                                recompute=cfg.recompute, seed=cfg.seed)
            self.model = TrainedModel(build_chunks(gvm_run, initialize=False),
                                      refresh_optimizer(cfg), cfg.parallel, gvm_run.precision,
                                      refresh_updates_total(cfg),
                                      cfg.checkpoint.override_scheduler)
            self.units, self.gvm = {"gvm": self.model}, self.model.chunks
            self.frozen = {}
        else:
            self.gvm = frozen_model(cfg, gvm_cfg.model, cfg.dvpo.gvm)
            self.frozen = {"gvm": self.gvm}
        self.alignment = gvm_cfg.gvm.alignment
        self.whitened = reads_released_whitening(cfg.dvpo.estimator, cfg.dvpo.value_whitening)
        self.micro_batch_size, self.offload = cfg.data.micro_batch_size, cfg.dvpo.gvm_offload
        state = Path(cfg.dvpo.gvm) / "train_state.json"  # absent for a converted GVM
        trained = json.loads(state.read_text()) if state.is_file() else {}
        self.value_range = trained.get("value_range")
        self.spread_limit = trained.get("head_spread_limit")
        self.pessimism = cfg.dvpo.head_pessimism
        if self.value_range is None:
            distributed.print_rank0(f"dvpo.gvm={cfg.dvpo.gvm} records no value range (not "
                                    "trained here): rollout/gvm_value_ood_rate is not logged")
        elif flat := flat_value_range(self.value_range, gvm_cfg.data.chosen_reward
                                      - gvm_cfg.data.rejected_reward):
            distributed.print_rank0(f"warning: dvpo.gvm={cfg.dvpo.gvm}: {flat}")

    def initialize(self) -> None:
        if self.model is not None:
            self.model.load_weights(self.cfg.dvpo.gvm)

    def score(self, rollout: Rollout) -> Scores:
        offload = self.offload and torch.cuda.is_available()
        if offload:  # the GVM lives on the host between scorings
            for chunk in self.gvm:
                chunk.cuda()
        values = rollout_values(self.gvm, rollout, self.micro_batch_size)
        if offload:
            for chunk in self.gvm:
                chunk.cpu()
        width, lengths, mask = rollout.prompt_width, rollout.response_lengths, rollout.response_mask

        def view(outputs: torch.Tensor) -> torch.Tensor:
            return rollout_q_view(outputs, width, lengths, self.alignment)[0]

        mean, spread = read_heads(values)
        read = mean if spread is None else mean - self.pessimism * spread  # what DVPO reads
        plain, plain_prompt = rollout_q_view(read, width, lengths, self.alignment)
        q, q_prompt = (released_whitened_q_view(read, width, lengths, self.alignment,
                                                self.micro_batch_size)
                       if self.whitened else (plain, plain_prompt))
        # the range and the spread limit were measured on the heads' mean and std
        mean_q = plain if read is mean else view(mean)
        spread_q = None if spread is None else view(spread)
        ood = out_of_range(mean_q, *self.value_range) & mask if self.value_range else None
        disagrees = ((spread_q > self.spread_limit) & mask if self.spread_limit is not None
                     else None)
        return GVMScores(final_value=plain.gather(1, (lengths - 1)[:, None]).squeeze(1),
                         q=q, q_prompt=q_prompt, out_of_range=ood, head_spread=spread_q,
                         disagrees=disagrees)

    def learn(self, rollout, scores, advantages, seed) -> None:
        return None  # the GVM never learns from the policy's advantages


class RewardCriticScorer:
    """PPO's frozen Bradley-Terry reward model and its online critic (docs/algorithm.md §3)."""

    final_value_tag = RewardModelScorer.final_value_tag
    scores = CriticScores

    def __init__(self, cfg: RunConfig, reward_cfg: RunConfig, critic_cfg: RunConfig,
                 total_updates: int):
        self.cfg = cfg
        self.reward_model = frozen_model(cfg, reward_cfg.model, cfg.ppo.reward_model)
        self.frozen = {"reward_model": self.reward_model}
        critic_run = RunConfig(model=critic_cfg.model, parallel=cfg.parallel,
                               precision=cfg.precision, recompute=cfg.recompute,
                               optimizer=cfg.optimizer, seed=cfg.seed)
        self.critic = TrainedModel(build_chunks(critic_run, initialize=False), cfg.optimizer,
                                   cfg.parallel, cfg.precision, total_updates,
                                   cfg.checkpoint.override_scheduler)
        self.units = {"critic": self.critic}

    def initialize(self) -> None:
        self.critic.load_weights(self.cfg.ppo.critic)

    def score(self, rollout: Rollout) -> Scores:
        mbs, width = self.cfg.data.micro_batch_size, rollout.prompt_width
        lengths = rollout.response_lengths
        reward = sequence_rewards(self.reward_model, rollout, mbs)
        # V(s_t) is the critic's output before token t: the prompt's, then y_0, y_1, ...
        v, v_prompt = rollout_q_view(rollout_values(self.critic.chunks, rollout, mbs), width,
                                     lengths)
        values = torch.cat([v_prompt[:, None], v[:, :-1]], 1) * rollout.response_mask
        return CriticScores(final_value=reward, rewards=reward, state_values=values)

    def learn(self, rollout: Rollout, scores: Scores, advantages: Advantages,
              seed: list[int]) -> UpdateSummary:
        return update_critic(self.critic, rollout, scores.state_values, advantages.returns,
                             self.cfg.rl, self.cfg.ppo.value_loss, self.cfg.ppo.value_clip_eps,
                             self.cfg.data, seed)
