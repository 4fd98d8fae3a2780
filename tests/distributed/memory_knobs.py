"""Run under torchrun: activation recompute and overlapped gradient reduction change no number.

Each data-parallel rank draws its own microbatches for each update (a reduction that went
missing or ran twice would show). For each variant the same weights are trained for one DDP forward-backward and
two Adam steps, for the policy (log-prob head) and the GVM (value head); the reduced gradients
and the stepped weights are compared with the variant-free run element by element. Rank 0
writes the largest differences as JSON.

Usage: torchrun --nproc-per-node N memory_knobs.py OUT_JSON VARIANT [VARIANT ...]
where VARIANT is one of: selective, full_uniform, full_block, overlap, full_uniform+overlap.
"""

import json
import sys
from pathlib import Path

import torch
from megatron.core import parallel_state

from megatron_dvpo import distributed
from megatron_dvpo.config import ParallelConfig, load_config
from megatron_dvpo.models import forward as fw
from megatron_dvpo.models.gpt import build_model_chunks
from megatron_dvpo.models.gvm import build_gvm_chunks
from megatron_dvpo.training.trained_model import build_optimizer, wrap_ddp

VOCAB = 250
MODEL = ["model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4",
         "model.num_query_groups=2", "model.ffn_hidden_size=128", f"model.vocab_size={VOCAB}",
         "model.max_position_embeddings=64", "model.hidden_dropout=0.0",
         "model.attention_dropout=0.0"]
VARIANTS = {
    "none": [],
    "selective": ["recompute.granularity=selective"],
    "full_uniform": ["recompute.granularity=full", "recompute.method=uniform",
                     "recompute.num_layers=2"],
    "full_block": ["recompute.granularity=full", "recompute.method=block",
                   "recompute.num_layers=3"],
    "overlap": ["parallel.overlap_grad_reduce=true", "parallel.ddp_bucket_size=20000"],
    "full_uniform+overlap": ["recompute.granularity=full", "recompute.num_layers=1",
                             "parallel.overlap_grad_reduce=true"],
}


def inputs(update: int):
    g = torch.Generator().manual_seed(7 + 10 * update + parallel_state.get_data_parallel_rank())
    tokens = torch.randint(0, VOCAB, (4, 12), generator=g)
    weights = torch.rand(4, 11, generator=g)
    targets = torch.randn(4, 12, generator=g)
    return fw.make_microbatches(2, tokens=tokens, weights=weights, targets=targets)


def policy_loss(outputs, batch):
    return -(outputs["logprobs"] * batch["weights"]).sum() / batch["weights"].numel(), {}


def gvm_loss(outputs, batch):
    return 0.5 * ((outputs["values"] - batch["targets"]) ** 2).mean(), {}


UPDATES = 2


def count_calls(module: torch.nn.Module, counts: dict, key: str) -> None:
    counts[key] = 0

    def hook(*_):
        counts[key] += 1
    module.register_forward_hook(hook)


def in_backward_counter(start_grad_sync, counts: dict):
    def wrapped(*args, **kwargs):
        counts["reductions_started_in_backward"] += torch._C._current_graph_task_id() != -1
        return start_grad_sync(*args, **kwargs)
    return wrapped


def train_step(variant: str, value_model: bool):
    """(reduced gradients of the last update, weights after it, forward calls of layer 0's MLP
    and attention core, buckets whose reduction started during the last backward) of
    ``UPDATES`` updates from the same initial weights. A recomputed module runs twice; megatron
    overlaps reductions from the second update on (the first one counts what is ready)."""
    cfg = load_config(None, MODEL + VARIANTS[variant] + ["optimizer.lr=0.01",
                                                         "optimizer.adam_eps=1e-4"])
    distributed.seed_everything(1234)
    chunks = (build_gvm_chunks(cfg, value_head_init_std=0.1) if value_model
              else build_model_chunks(cfg))
    head, loss = ((fw.gvm_values_head, gvm_loss) if value_model
                  else (fw.policy_logprobs_head(VOCAB), policy_loss))
    calls = {}
    layer = chunks[0].decoder.layers[0]
    count_calls(layer.mlp, calls, "mlp")
    count_calls(layer.self_attention.core_attention, calls, "core_attention")
    ddp = wrap_ddp(chunks, cfg.parallel)
    calls["buckets"] = len(ddp[0].bucket_groups)
    for group in ddp[0].bucket_groups:
        group.start_grad_sync = in_backward_counter(group.start_grad_sync, calls)
    optimizer = build_optimizer(ddp, cfg.optimizer, cfg.parallel, cfg.precision)
    for update in range(UPDATES):
        calls["reductions_started_in_backward"] = 0
        for chunk in ddp:
            chunk.train()
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        fw.run_microbatches(ddp, inputs(update), head, loss)
        grads = {n: p.main_grad.clone() for n, p in chunks[0].named_parameters()}
        optimizer.step()
    return grads, {n: p.detach().clone() for n, p in chunks[0].named_parameters()}, calls


def max_diff(a: dict, b: dict) -> float:
    local = torch.tensor([max((a[n] - b[n]).abs().max().item() for n in a)], dtype=torch.float64)
    torch.distributed.all_reduce(local, op=torch.distributed.ReduceOp.MAX)
    return local.item()


def main():
    out_json, variants = sys.argv[1], sys.argv[2:]
    distributed.init_distributed(ParallelConfig(), seed=1234)
    results = {}
    for value_model, name in ((False, "policy"), (True, "gvm")):
        ref_grads, ref_weights, calls = train_step("none", value_model)
        results[f"{name}_none_calls"] = calls
        # the ranks' data differ, so equal reduced gradients show the reduction ran
        mine = torch.cat([g.flatten() for g in ref_grads.values()])
        other = mine.clone()
        torch.distributed.broadcast(other, src=0)
        results[f"{name}_grad_rank_diff"] = (mine - other).abs().max().item()
        results[f"{name}_grad_max_abs"] = mine.abs().max().item()
        for variant in variants:
            grads, weights, calls = train_step(variant, value_model)
            results[f"{name}_{variant}_calls"] = calls
            results[f"{name}_{variant}_grad_max_diff"] = max_diff(grads, ref_grads)
            results[f"{name}_{variant}_stepped_max_diff"] = max_diff(weights, ref_weights)
    if distributed.is_rank0():
        Path(out_json).write_text(json.dumps(results, indent=2))
    distributed.shutdown()


if __name__ == "__main__":
    main()
