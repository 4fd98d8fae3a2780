"""Run under torchrun: overlapped parameter all-gather (distributed optimizer) changes no weight.

The same policy is trained for ``UPDATES`` updates, each data-parallel rank on its own
microbatches, with the distributed optimizer, once with ``parallel.overlap_param_gather`` and
once without. Rank 0 writes as JSON: how far the overlapped run's weights are from the plain
run's just after the last step (stale outside the rank's shard: the gather is really left to the
next forward pass), after a forward pass (the pre-hooks gathered them), after ``sync_params``
(no forward at all), and in a checkpoint saved straight after a step.

Usage: torchrun --nproc-per-node 2 param_gather.py OUT_JSON WORK_DIR
"""

import json
import sys
from pathlib import Path

import torch
from megatron.core import parallel_state

from megatron_dvpo import distributed
from megatron_dvpo.checkpointing import CheckpointManager, load_model
from megatron_dvpo.config import ParallelConfig, load_config
from megatron_dvpo.models import build_chunks
from megatron_dvpo.models import forward as fw
from megatron_dvpo.training.trained_model import TrainedModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from distributed.losses import mean_logprob_loss  # noqa: E402

VOCAB = 250
MODEL = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
         "model.ffn_hidden_size=128", f"model.vocab_size={VOCAB}",
         "model.max_position_embeddings=64", "parallel.use_distributed_optimizer=true",
         "parallel.overlap_grad_reduce=true", "parallel.ddp_bucket_size=10000",
         "optimizer.lr=0.01"]
UPDATES = 3


def microbatches(update: int) -> list[dict]:
    g = torch.Generator().manual_seed(7 + 10 * update + parallel_state.get_data_parallel_rank())
    return fw.make_microbatches(2, tokens=torch.randint(0, VOCAB, (4, 12), generator=g))


loss = mean_logprob_loss()


def trained(overlap: bool) -> tuple[TrainedModel, object]:
    cfg = load_config(None, MODEL + [f"parallel.overlap_param_gather={str(overlap).lower()}"])
    distributed.seed_everything(1234)
    model = TrainedModel(build_chunks(cfg), cfg.optimizer, cfg.parallel, cfg.precision, UPDATES)
    for update in range(UPDATES):
        assert model.update(microbatches(update), fw.policy_logprobs_head(VOCAB), loss).applied
    return model, cfg


def weights(model: TrainedModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.chunks[0].named_parameters()}


def max_diff(a: dict, b: dict) -> float:
    local = torch.tensor([max((a[n] - b[n]).abs().max().item() for n in a)], dtype=torch.float64)
    torch.distributed.all_reduce(local, op=torch.distributed.ReduceOp.MAX)
    return local.item()


def main():
    out_json, work = sys.argv[1], Path(sys.argv[2])
    distributed.init_distributed(ParallelConfig(), seed=1234)
    plain, _ = trained(overlap=False)
    expected = weights(plain)
    probe = microbatches(99)
    expected_logp = fw.run_microbatches(plain.ddp, probe, fw.policy_logprobs_head(VOCAB),
                                        forward_only=True)[0]["logprobs"]
    results = {"buckets": len(plain.ddp[0].bucket_groups)}

    model, _ = trained(overlap=True)
    results["stale_before_forward"] = max_diff(weights(model), expected)
    logp = fw.run_microbatches(model.ddp, probe, fw.policy_logprobs_head(VOCAB),
                               forward_only=True)[0]["logprobs"]
    results["logprob_diff_first_forward"] = (logp - expected_logp).abs().max().item()
    results["after_forward"] = max_diff(weights(model), expected)

    model, cfg = trained(overlap=True)
    model.sync_params()
    results["after_sync_params"] = max_diff(weights(model), expected)
    results["hooks_after_sync"] = len(model.ddp[0].remove_forward_pre_hook_handles)
    model.update(microbatches(UPDATES), fw.policy_logprobs_head(VOCAB), loss)
    results["hooks_in_update"] = len(model.ddp[0].remove_forward_pre_hook_handles)

    model, cfg = trained(overlap=True)
    cfg.checkpoint.save_dir = str(work)
    path = CheckpointManager(cfg.checkpoint, {"model": model}, lambda: "").save(UPDATES, {})
    fresh = build_chunks(cfg)
    load_model(fresh, path / "model")
    results["checkpoint"] = max_diff({n: p.detach() for n, p in fresh[0].named_parameters()},
                                     expected)
    if distributed.is_rank0():
        Path(out_json).write_text(json.dumps(results, indent=2))
    distributed.shutdown()


if __name__ == "__main__":
    main()
