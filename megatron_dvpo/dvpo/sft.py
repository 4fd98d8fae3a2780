"""Supervised warm start of a policy: next-token loss on the responses of prompt/response data.

    torchrun --nproc-per-node N -m megatron_dvpo.dvpo.sft --config FILE checkpoint.init_from=DIR

Reads the same JSONL forms as GVM pretraining (preference rows contribute both responses); only
response tokens are scored. Used by the demo to give a random policy the task's word-level
language before preference data is sampled from it.
"""

from __future__ import annotations


from megatron.core import parallel_state

from megatron_dvpo import distributed
from megatron_dvpo.config import RunConfig
from megatron_dvpo.data.dataset import collate
from megatron_dvpo.gvm.train import check_training_inputs, open_data
from megatron_dvpo.models import build_chunks, forward
from megatron_dvpo.training import Trainer, run_trainer


class SFTTrainer(Trainer):
    summary_tags = ("sft/loss", "perf/train_tokens_per_s")

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg, build_chunks(cfg))
        self.data = open_data(cfg, cfg.data.train_path)

    def train_step(self) -> dict[str, float]:
        batch = collate([self.data[i] for i in self.next_indices(len(self.data))],
                        self.cfg.data.seq_length, self.data.pad_id)
        # logprobs[:, p] scores token p + 1: response tokens are scored where the mask, shifted
        # left by one, is set
        scored = batch["response_mask"][:, 1:]
        tokens = distributed.all_reduce_data_parallel(float(scored.sum()))
        dp = parallel_state.get_data_parallel_world_size()

        def loss_fn(outputs, mb):
            nll = -(outputs["logprobs"] * mb["scored"]).sum()
            return nll / tokens * dp, {"nll_sum": nll.detach()}

        microbatches = forward.make_microbatches(self.cfg.data.micro_batch_size,
                                                 tokens=batch["tokens"], scored=scored)
        outputs, grad_norm, _ = self.train_batch(
            microbatches, forward.policy_logprobs_head(self.cfg.model.vocab_size), loss_fn)
        local = {"nll_sum": sum(float(o["nll_sum"]) for o in outputs)} if outputs else None
        nll = distributed.sum_over_replicas(["nll_sum"], local)["nll_sum"]
        return {"sft/loss": nll / tokens, "sft/grad_norm": float(grad_norm),
                "sft/lr": self.optimizer.param_groups[0]["lr"]}


def main(argv=None) -> None:
    run_trainer(SFTTrainer, __doc__.splitlines()[0], argv,
                lambda cfg, overrides: check_training_inputs(cfg, overrides, value_model=False))


if __name__ == "__main__":
    main()
