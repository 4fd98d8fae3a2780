"""DPO on the GVM's preference data, for comparison: no sampling, no value model.

    torchrun --nproc-per-node N -m megatron_dvpo.rl.dpo --config FILE checkpoint.init_from=DIR \
        data.train_path=pairs.jsonl [dpo.beta=0.1] [dpo.reference=DIR | dpo.reference_free=true]

Each step takes ``data.global_batch_size`` (chosen, rejected) pairs, scores both responses
under the policy and the frozen reference (``dpo.reference``, default: the starting policy),
and minimises ``-log sigmoid(beta * ((c - c_ref) - (r - r_ref)))`` averaged over the pairs
(docs/algorithm.md §3), the sums of response-token log-probs. The policy is the trained unit
``model``, checkpointed with the data position, so a run resumes exactly.
"""

from __future__ import annotations

import time

import torch
from megatron.core import parallel_state

from megatron_dvpo import distributed
from megatron_dvpo.checkpointing import resolve_checkpoint_dir
from megatron_dvpo.config import ConfigError, RunConfig
from megatron_dvpo.data.dataset import collate
from megatron_dvpo.data.inputs import check_training_inputs, open_data
from megatron_dvpo.data.sampler import BatchSource
from megatron_dvpo.device import to_device
from megatron_dvpo.models import forward
from megatron_dvpo.rl.losses import dpo_loss
from megatron_dvpo.rl.scorers import frozen_model
from megatron_dvpo.training.cli import run_trainer
from megatron_dvpo.training.job import JobDefaults
from megatron_dvpo.training.loop import StepResult
from megatron_dvpo.training.loss import Loss
from megatron_dvpo.training.trained_model import trained_policy

SUMS = ("loss_sum", "correct", "margin_sum", "chosen_reward_sum", "rejected_reward_sum")


def check_dpo_inputs(cfg: RunConfig, overrides: list[str] | tuple = ()) -> None:
    """Everything DPO reads, before any process group."""
    if not cfg.checkpoint.init_from:
        raise ConfigError("checkpoint.init_from is required: the policy DPO starts from")
    check_training_inputs(cfg, list(overrides), value_model=False)
    if cfg.data.micro_batch_size % 2:
        raise ConfigError("DPO needs an even data.micro_batch_size (whole pairs per "
                          "microbatch)")
    if cfg.dpo.label_smoothing and cfg.dpo.loss != "sigmoid":
        raise ConfigError(f"dpo.label_smoothing={cfg.dpo.label_smoothing} smooths the sigmoid "
                          f"loss; dpo.loss={cfg.dpo.loss} has no labels to smooth")
    if not cfg.dpo.reference_free:
        cfg.dpo.reference = str(resolve_checkpoint_dir(
            cfg.dpo.reference or cfg.checkpoint.init_from, "dpo.reference"))
    if not len(open_data(cfg, cfg.data.train_path).pairs()):
        raise ConfigError(f"DPO learns from preference pairs, and {cfg.data.train_path} has "
                          "none")


class DPOTrainer(JobDefaults):
    summary_tags = ("dpo/loss", "dpo/reward_accuracy", "dpo/margin", "perf/train_tokens_per_s")

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.model = trained_policy(cfg)
        self.units = {"model": self.model}
        self.reference = (None if cfg.dpo.reference_free
                          else frozen_model(cfg, cfg.model, cfg.dpo.reference))
        self.data = open_data(cfg, cfg.data.train_path)
        self.pairs = self.data.pairs()
        self.batches = BatchSource(cfg.data.global_batch_size,
                                   parallel_state.get_data_parallel_rank(),
                                   parallel_state.get_data_parallel_world_size(), cfg.seed)
        distributed.print_rank0(f"DPO: {len(self.pairs)} pairs from {cfg.data.train_path}, "
                                f"reference {cfg.dpo.reference or 'none (reference-free)'}")

    @property
    def frozen_models(self) -> dict[str, list[torch.nn.Module]]:
        return {"reference": self.reference} if self.reference else {}

    def initialize(self) -> None:
        self.model.load_weights(self.cfg.checkpoint.init_from)

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)

    def _reference_logprobs(self, tokens: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        """[B] the reference's summed response log-probs (zeros off the last stage, which
        alone computes the loss, and without a reference)."""
        if self.reference is None:
            return torch.zeros(tokens.shape[0], device=tokens.device)
        logprobs = forward.token_logprobs(
            self.reference, forward.make_microbatches(self.cfg.data.micro_batch_size,
                                                      tokens=tokens), self.cfg.model.vocab_size)
        if logprobs is None:
            return torch.zeros(tokens.shape[0], device=tokens.device)
        return (logprobs * scored).sum(1)

    def step(self, step: int) -> StepResult:
        start = time.perf_counter()
        data = self.cfg.data
        indices = [int(i) for p in self.batches.next_indices(len(self.pairs))
                   for i in self.pairs[p]]  # chosen, rejected, chosen, ...
        batch = collate([self.data[i] for i in indices], data.seq_length, self.data.pad_id)
        tensors = to_device({"tokens": batch["tokens"], "scored": batch["response_mask"][:, 1:]})
        tensors["ref"] = self._reference_logprobs(tensors["tokens"], tensors["scored"])
        options = self.cfg.dpo

        def terms(outputs, mb):
            seq = (outputs["logprobs"] * mb["scored"]).sum(1)
            loss, stats = dpo_loss(seq[0::2], seq[1::2], mb["ref"][0::2], mb["ref"][1::2],
                                   options.beta, options.loss, options.label_smoothing)
            return {"pairs": loss}, {"loss_sum": loss.detach(), **stats}

        lengths = batch["prompt_lengths"] + batch["response_lengths"]
        microbatches = forward.split_microbatches(data.micro_batch_size, data.micro_batch_tokens,
                                                  lengths, 2, **tensors)
        update = self.model.update(microbatches,
                                   forward.policy_logprobs_head(self.cfg.model.vocab_size,
                                                                chunk=forward.LOGPROB_CHUNK),
                                   Loss(terms, lambda mb: {"pairs": mb["tokens"].shape[0] // 2},
                                        SUMS))
        sums, pairs = update.sums, max(update.counts["pairs"], 1.0)
        seq_tokens = distributed.all_reduce_data_parallel(float(lengths.sum()))
        return StepResult({"dpo/loss": sums["loss_sum"] / pairs,
                           "dpo/reward_accuracy": sums["correct"] / pairs,
                           "dpo/margin": sums["margin_sum"] / pairs,
                           "dpo/chosen_reward": sums["chosen_reward_sum"] / pairs,
                           "dpo/rejected_reward": sums["rejected_reward_sum"] / pairs,
                           "dpo/grad_norm": update.grad_norm or 0.0, "dpo/lr": self.model.lr,
                           **update.router_metrics("dpo"),
                           "perf/train_tokens_per_s": seq_tokens / (time.perf_counter() - start)},
                          [update])


def main(argv=None) -> None:
    run_trainer(DPOTrainer, __doc__.splitlines()[0], argv, check_dpo_inputs)


if __name__ == "__main__":
    main()
