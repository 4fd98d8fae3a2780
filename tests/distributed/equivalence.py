"""Run under torchrun: compare log-probs, values, gradients and an optimizer step across layouts.

A TP=1/PP=1 reference is built (every rank holds the whole model, DP = world size), its weights
are saved as a dist checkpoint, and each requested layout loads them (resharding on load), runs
the same microbatches forward-only, then forward-backward through megatron DDP and one Adam step
of the megatron optimizer. Its gradients and updated weights are saved as dist checkpoints, which
load back at TP=1 as full tensors and are compared with the reference's element by element.
All of it runs in fp32 and again in bf16 (results ``<layout>-bf16``, against a bf16 reference);
the bf16 results also record the largest magnitude of each compared quantity.
The policy ties its embeddings (as Llama-3.2-1B does), so PP also checks the tied-gradient
all-reduce. Rank 0 writes the largest differences as JSON.

Usage: torchrun --nproc-per-node N equivalence.py OUT_JSON WORKDIR LAYOUT [LAYOUT ...]
where LAYOUT is tp<T>pp<P>[vpp<V>][ep<E>][sp][dopt], e.g. tp2pp1, tp1pp2vpp2, tp2pp2,
tp2pp1spdopt (sp: sequence parallelism, dopt: the distributed optimizer, ep: expert
parallelism). ``--moe`` first makes both models mixtures of experts (4 experts, top-2, with the
load-balancing loss), and gives each data-parallel rank its own rows: layouts then keep the
reference's data-parallel size (tp1pp1ep2 on 2 ranks). ``--moe-same-rows`` is the same models
with the same rows on every rank, for layouts that change the data-parallel size (tp2pp1ep2 on
4 ranks).
"""

import json
import re
import sys
from pathlib import Path

import torch
from megatron.core import parallel_state

from megatron_dvpo import distributed
from megatron_dvpo.checkpointing import load_model, save_model
from megatron_dvpo.config import ParallelConfig, load_config
from megatron_dvpo.models import forward as fw
from megatron_dvpo.models.gpt import build_model_chunks
from megatron_dvpo.models.gvm import build_gvm_chunks
from megatron_dvpo.training.trained_model import build_optimizer, wrap_ddp

VOCAB = 250  # padded to 256: exercises the masking of padded vocabulary columns
MODEL = ["model.tie_embeddings=true", "model.num_layers=4", "model.hidden_size=64",
         "model.num_attention_heads=4",
         "model.num_query_groups=2", "model.ffn_hidden_size=128", f"model.vocab_size={VOCAB}",
         "model.max_position_embeddings=64"]
SEQ, ROWS, MICRO = 12, 4, 2  # two microbatches of two rows
OPTIONS: set[str] = set()  # "moe", "own-rows": see the module's docstring


MOE = ["model.num_experts=4", "model.moe_router_topk=2", "model.moe_aux_loss_coeff=0.01"]


def parse_layout(text: str) -> ParallelConfig:
    m = re.fullmatch(r"tp(\d+)pp(\d+)(?:vpp(\d+))?(?:ep(\d+))?(sp)?(dopt)?", text)
    if not m:
        raise SystemExit(f"bad layout {text!r}")
    return ParallelConfig(tensor_model_parallel_size=int(m[1]),
                          pipeline_model_parallel_size=int(m[2]),
                          virtual_pipeline_model_parallel_size=int(m[3]) if m[3] else None,
                          expert_model_parallel_size=int(m[4] or 1),
                          sequence_parallel=bool(m[5]),
                          use_distributed_optimizer=bool(m[6]))


def inputs():
    """The same rows on every rank; with --moe each data-parallel rank's own."""
    rank = parallel_state.get_data_parallel_rank() if "own-rows" in OPTIONS else 0
    g = torch.Generator().manual_seed(7 + rank)
    tokens = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
    weights = torch.rand(ROWS, SEQ - 1, generator=g)  # per-token loss weights for the policy
    targets = torch.randn(ROWS, SEQ, generator=g)  # value regression targets for the GVM
    return fw.make_microbatches(MICRO, tokens=tokens, weights=weights, targets=targets)


def policy_loss(outputs, batch):
    return -(outputs["logprobs"] * batch["weights"]).sum() / batch["weights"].numel(), {}


def gvm_loss(outputs, batch):
    return 0.5 * ((outputs["values"] - batch["targets"]) ** 2).mean(), {}


DTYPES = {"": "fp32", "-bf16": "bf16"}  # a result's suffix -> precision.params_dtype


def build(layout: ParallelConfig, dtype: str):
    distributed.set_parallel_layout(layout)
    distributed.seed_everything(1234)
    extra = MOE if "moe" in OPTIONS else []
    cfg = load_config(None, MODEL + extra + ["optimizer.lr=0.01", "optimizer.clip_grad=1.0",
                                   # Adam's first step is ~lr*sign(g): a larger eps keeps
                                   # near-zero gradients from amplifying rounding noise.
                                   "optimizer.adam_eps=1e-4",
                                   f"precision.params_dtype={dtype}"])
    cfg.parallel = layout
    return cfg, build_model_chunks(cfg), build_gvm_chunks(cfg, value_head_init_std=0.1)


def train_step(cfg, chunks, head, loss):
    """One DDP forward-backward and optimizer step; returns (loss, grads, grad_norm)."""
    ddp = wrap_ddp(chunks, cfg.parallel)
    optimizer = build_optimizer(ddp, cfg.optimizer, cfg.parallel, cfg.precision)
    for chunk in ddp:
        chunk.train()
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    out = fw.run_microbatches(ddp, inputs(), head, loss)
    grads = {(i, n): p.main_grad.clone() for i, c in enumerate(chunks)
             for n, p in c.named_parameters()}
    _, grad_norm, _ = optimizer.step()
    return sum(o["loss"].item() for o in out) if out else None, grads, grad_norm


def run(cfg, policy, gvm):
    """Forward-only outputs, then a training step of each model."""
    mbs = inputs()
    logprobs = fw.token_logprobs(policy, mbs, VOCAB)
    values = fw.token_values(gvm, mbs)
    steps = [train_step(cfg, policy, fw.policy_logprobs_head(VOCAB), policy_loss),
             train_step(cfg, gvm, fw.gvm_values_head, gvm_loss)]
    return logprobs, values, steps


def params_to(chunks, tensors):
    """Overwrite each parameter, so that a checkpoint of the model holds e.g. its gradients."""
    with torch.no_grad():
        for i, chunk in enumerate(chunks):
            for n, p in chunk.named_parameters():
                p.copy_(tensors[(i, n)])


def max_diff(a, b) -> float:
    return -1.0 if a is None or b is None else (a - b).abs().max().item()


def all_max(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.item()


def flat_params(chunks):
    """Parameters keyed by (chunk, local name): names repeat across VPP chunks."""
    return {(i, n): p.detach().clone() for i, c in enumerate(chunks)
            for n, p in c.named_parameters()}


def compare_layouts(workdir: Path, layouts: list[str], suffix: str) -> dict:
    """Every layout against the TP=1/PP=1 reference, in the precision of ``suffix``."""
    dtype = DTYPES[suffix]
    reference_layout = ParallelConfig()
    cfg, policy, gvm = build(reference_layout, dtype)
    save_model(policy, workdir / f"policy{suffix}")
    save_model(gvm, workdir / f"gvm{suffix}")
    ref_logprobs, ref_values, ref_steps = run(cfg, policy, gvm)
    reference = {"policy": (ref_steps[0], flat_params(policy)),
                 "gvm": (ref_steps[1], flat_params(gvm))}

    results = {}
    for name in layouts:
        cfg, policy, gvm = build(parse_layout(name), dtype)
        load_model(policy, workdir / f"policy{suffix}")
        load_model(gvm, workdir / f"gvm{suffix}")
        logprobs, values, steps = run(cfg, policy, gvm)
        results[name] = {
            "logprobs_max_diff": all_max(max_diff(logprobs, ref_logprobs)),
            "values_max_diff": all_max(max_diff(values, ref_values)),
            "last_stage_outputs": all_max(0.0 if logprobs is None else float(logprobs.numel())),
            "logprobs_max_abs": ref_logprobs.abs().max().item(),
            "values_max_abs": ref_values.abs().max().item(),
        }
        for key, chunks, (loss, grads, grad_norm) in (("policy", policy, steps[0]),
                                                      ("gvm", gvm, steps[1])):
            ref_loss, _, ref_norm = reference[key][0]
            results[name][f"{key}_loss_diff"] = all_max(-1.0 if loss is None
                                                        else abs(loss - ref_loss))
            results[name][f"{key}_grad_norm_diff"] = abs(grad_norm - ref_norm)
            results[name][f"{key}_grad_norm"] = ref_norm
            save_model(chunks, workdir / f"{name}{suffix}-{key}-stepped")
            params_to(chunks, grads)
            save_model(chunks, workdir / f"{name}{suffix}-{key}-grads")

    # Back at TP=1/PP=1, each layout's gradients and stepped weights load as full tensors.
    for name in layouts:
        _, policy, gvm = build(reference_layout, dtype)
        for key, chunks in (("policy", policy), ("gvm", gvm)):
            (_, ref_grads, _), ref_stepped = reference[key]
            for what, ref in (("grad", ref_grads), ("stepped", ref_stepped)):
                plural = "s" if what == "grad" else ""
                load_model(chunks, workdir / f"{name}{suffix}-{key}-{what}{plural}")
                got = flat_params(chunks)
                diffs = {n: (got[n].float() - ref[n].float()).abs().max().item() for n in ref}
                results[name][f"{key}_{what}_max_diff"] = max(diffs.values())
                results[name][f"{key}_{what}_worst_param"] = max(diffs, key=diffs.get)[1]
                results[name][f"{key}_{what}_max_abs"] = max(r.abs().max().item()
                                                             for r in ref.values())
            results[name][f"{key}_grad_max_abs"] = max(g.abs().max().item()
                                                       for g in ref_grads.values())
    return {f"{name}{suffix}": result for name, result in results.items()}


def main():
    out_json, workdir, layouts = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    if layouts and layouts[0] in ("--moe", "--moe-same-rows"):
        OPTIONS.update({"moe"} if layouts[0] == "--moe-same-rows" else {"moe", "own-rows"})
        layouts = layouts[1:]
    distributed.init_distributed(ParallelConfig(), seed=1234)
    results = {}
    for suffix in DTYPES:
        results.update(compare_layouts(workdir, layouts, suffix))
    if distributed.is_rank0():
        Path(out_json).write_text(json.dumps(results, indent=2))
    distributed.shutdown()


if __name__ == "__main__":
    main()
