"""Run under torchrun: vocab-parallel log-probs and entropy against a full-vocabulary reference.

Usage: torchrun --nproc-per-node N vocab_parallel_check.py OUT_JSON
At TP=N, for micro-batch sizes 1 and 3 and fp32/bf16 logits, each rank holds its shard of the
same random logits (the padded vocabulary columns included) and computes log-probs, then the
entropy, from that one tensor, in the order the policy head does. Rank 0 writes the largest
differences to a float64 reference over the unpadded vocabulary, forward and gradient
(the gradient's relative to its largest entry).
"""

import json
import sys
from pathlib import Path

import torch

from megatron_dvpo import distributed
from megatron_dvpo.config import ParallelConfig
from megatron_dvpo.models import forward

VOCAB, PADDED, SEQ = 250, 256, 5


def reference(full: torch.Tensor, labels: torch.Tensor):
    logits = full[..., :VOCAB].double()
    logp = logits.log_softmax(-1)
    return logp.gather(-1, labels[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def check(tp: int, rank: int, mbs: int, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(mbs * 10 + (dtype == torch.bfloat16))
    full = (torch.randn(mbs, SEQ, PADDED, generator=g) * 3).to(dtype)
    labels = torch.randint(0, VOCAB, (mbs, SEQ), generator=g)
    weights = torch.rand(mbs, SEQ, 2, generator=g, dtype=torch.float64)
    shard = PADDED // tp
    local = full[..., rank * shard:(rank + 1) * shard].clone().requires_grad_(True)
    logprobs = forward.vocab_parallel_logprobs(local, labels, VOCAB)
    entropy = forward.vocab_parallel_entropy(local, VOCAB)
    ((logprobs * weights[..., 0]).sum() + (entropy * weights[..., 1]).sum()).backward()
    leaf = full.clone().double().requires_grad_(True)
    ref_logprobs, ref_entropy = reference(leaf, labels)
    ((ref_logprobs * weights[..., 0]).sum() + (ref_entropy * weights[..., 1]).sum()).backward()
    ref_grad = leaf.grad[..., rank * shard:(rank + 1) * shard]
    return {"logprobs": (logprobs.double() - ref_logprobs).abs().max().item(),
            "entropy": (entropy.double() - ref_entropy).abs().max().item(),
            # relative to the largest gradient: a bf16 leaf stores a bf16 gradient
            "grad": ((local.grad.double() - ref_grad).abs().max()
                     / ref_grad.abs().max()).item()}


def main():
    out = Path(sys.argv[1])
    distributed.init_distributed(ParallelConfig(), seed=0)
    results = {}
    world = torch.distributed.get_world_size()
    for tp in sorted({1, world}):
        distributed.set_parallel_layout(ParallelConfig(tensor_model_parallel_size=tp))
        rank = torch.distributed.get_rank() % tp
        for mbs in (1, 3):
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                diffs = check(tp, rank, mbs, dtype)
                for key, value in diffs.items():
                    t = torch.tensor([value], dtype=torch.float64)
                    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
                    results[f"tp{tp}_mbs{mbs}_{name}_{key}"] = t.item()
    if distributed.is_rank0():
        out.write_text(json.dumps(results, indent=2))
    distributed.shutdown()


if __name__ == "__main__":
    main()
