"""Supervised warm start of a policy: next-token loss on the responses of prompt/response data.

    torchrun --nproc-per-node N -m megatron_dvpo.sft --config FILE checkpoint.init_from=DIR

Reads the same JSONL forms as GVM pretraining (preference rows contribute both responses); only
response tokens are scored. Used by the demo to give a random policy the task's word-level
language before preference data is sampled from it.
"""

from __future__ import annotations

import time

from megatron.core import parallel_state

from megatron_dvpo import distributed
from megatron_dvpo.config import RunConfig
from megatron_dvpo.data.dataset import collate
from megatron_dvpo.data.inputs import check_training_inputs, open_data
from megatron_dvpo.data.sampler import BatchSource
from megatron_dvpo.device import to_device
from megatron_dvpo.models import forward
from megatron_dvpo.training.cli import run_trainer
from megatron_dvpo.training.job import JobDefaults
from megatron_dvpo.training.loop import StepResult
from megatron_dvpo.training.loss import Loss
from megatron_dvpo.training.trained_model import trained_policy


class SFTTrainer(JobDefaults):
    summary_tags = ("sft/loss", "perf/train_tokens_per_s")

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.model = trained_policy(cfg)
        self.units = {"model": self.model}
        self.batches = BatchSource(cfg.data.global_batch_size,
                                   parallel_state.get_data_parallel_rank(),
                                   parallel_state.get_data_parallel_world_size(), cfg.seed)
        self.data = open_data(cfg, cfg.data.train_path, allow_unscored=True)

    def initialize(self) -> None:
        if self.cfg.checkpoint.init_from:
            self.model.load_weights(self.cfg.checkpoint.init_from)
            distributed.print_rank0(f"initialised weights from {self.cfg.checkpoint.init_from}")

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)

    def step(self, step: int) -> StepResult:
        start = time.perf_counter()
        batch = collate([self.data[i] for i in self.batches.next_indices(len(self.data))],
                        self.cfg.data.seq_length, self.data.pad_id)
        # logprobs[:, p] scores token p + 1: response tokens are scored where the mask, shifted
        # left by one, is set
        scored = batch["response_mask"][:, 1:]

        def nll(outputs, mb):
            summed = -(outputs["logprobs"] * mb["scored"]).sum()
            return {"nll": summed}, {"nll_sum": summed.detach()}

        data = self.cfg.data
        lengths = batch["prompt_lengths"] + batch["response_lengths"]
        microbatches = forward.split_microbatches(
            data.micro_batch_size, data.micro_batch_tokens, lengths,
            **to_device({"tokens": batch["tokens"], "scored": scored}))
        update = self.model.update(microbatches,
                                   forward.policy_logprobs_head(self.cfg.model.vocab_size,
                                                                chunk=forward.LOGPROB_CHUNK),
                                   Loss(nll, lambda mb: {"nll": mb["scored"].sum()},
                                        ("nll_sum",)))
        seq_tokens = distributed.all_reduce_data_parallel(float(lengths.sum()))
        return StepResult({"sft/loss": update.sums["nll_sum"] / max(update.counts["nll"], 1.0),
                           "sft/grad_norm": update.grad_norm or 0.0, "sft/lr": self.model.lr,
                           **update.router_metrics("sft"),
                           "perf/train_tokens_per_s": seq_tokens / (time.perf_counter() - start)},
                          [update])


def main(argv=None) -> None:
    run_trainer(SFTTrainer, __doc__.splitlines()[0], argv,
                lambda cfg, overrides: check_training_inputs(cfg, overrides, value_model=False))


if __name__ == "__main__":
    main()
