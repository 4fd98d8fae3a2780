"""Run under torchrun: generation at several layouts against TP=1, and against a fresh forward.

Usage: torchrun --nproc-per-node N rollout_check.py OUT_JSON WORKDIR LAYOUT [LAYOUT ...]
Rank 0 writes, per layout: whether greedy tokens equal TP=1's, the largest log-prob difference
to TP=1, and the largest difference between sampled log-probs and a fresh forward pass (also at
temperature 0.6, where the forward pass must score the tempered distribution).
"""

import json
import sys
from pathlib import Path

import torch

from megatron_dvpo import distributed
from megatron_dvpo.checkpointing import load_model, save_model
from megatron_dvpo.config import ParallelConfig, load_config
from megatron_dvpo.models import forward
from megatron_dvpo.models.generation import SamplingConfig, generate
from megatron_dvpo.models.gpt import build_model_chunks
from megatron_dvpo.models.precision import SEQUENCE_PARALLEL_FLAGS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from distributed.equivalence import all_max, parse_layout  # noqa: E402

VOCAB, EOS, PAD = 250, 3, 0
MODEL = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
         "model.num_query_groups=2", "model.ffn_hidden_size=128", f"model.vocab_size={VOCAB}",
         "model.max_position_embeddings=64", "model.init_method_std=0.2"]
PROMPTS = [[2, 17, 45, 9], [2, 88], [2, 5, 6, 7, 8, 9, 10], [2, 120, 33]]


def build(layout):
    distributed.set_parallel_layout(layout)
    distributed.seed_everything(7)
    cfg = load_config(None, MODEL)
    cfg.parallel = layout
    return build_model_chunks(cfg)


def sequence_parallel_flags(chunks) -> list[bool]:
    return [getattr(m, name) for c in chunks for m in [c.config, *c.modules()]
            for name in SEQUENCE_PARALLEL_FLAGS if isinstance(getattr(m, name, None), bool)]


def rollouts(chunks):
    greedy = generate(chunks, PROMPTS, SamplingConfig(max_new_tokens=12, temperature=0.0),
                      EOS, PAD, VOCAB, seed=0)
    sampled = generate(chunks, PROMPTS, SamplingConfig(max_new_tokens=12, temperature=1.0,
                                                       top_p=0.9, top_k=50),
                       EOS, PAD, VOCAB, seed=11)
    fresh = forward.response_logprobs(chunks, sampled, VOCAB, micro_batch_size=2)
    diff = -1.0 if fresh is None else (fresh - sampled.logprobs).abs().max().item()
    # at temperature 0.6 both the sampler and the forward pass score softmax(logits / 0.6)
    tempered = generate(chunks, PROMPTS, SamplingConfig(max_new_tokens=12, temperature=0.6),
                        EOS, PAD, VOCAB, seed=5)
    fresh = forward.response_logprobs(chunks, tempered, VOCAB, 2, temperature=0.6)
    plain = forward.response_logprobs(chunks, tempered, VOCAB, 2)
    tempered_diff = -1.0 if fresh is None else (fresh - tempered.logprobs).abs().max().item()
    untempered_gap = -1.0 if plain is None else (plain - tempered.logprobs).abs().max().item()
    # EOS barred until the shortest greedy response's length: it must run longer, and the
    # recorded log-probs stay the policy's own (a fresh forward's, EOS not barred)
    least = int(greedy.response_lengths.min())
    floored = generate(chunks, PROMPTS, SamplingConfig(max_new_tokens=12, temperature=0.0,
                                                       min_new_tokens=least),
                       EOS, PAD, VOCAB, seed=0)
    fresh = forward.response_logprobs(chunks, floored, VOCAB, 2)
    floored_diff = -1.0 if fresh is None else (fresh - floored.logprobs).abs().max().item()
    return greedy, {"fresh_forward_max_diff": all_max(diff),
                    "tempered_fresh_forward_max_diff": all_max(tempered_diff),
                    "untempered_gap": all_max(untempered_gap),
                    "min_new_tokens": least,
                    "min_new_tokens_lengths": floored.response_lengths.tolist(),
                    "min_new_tokens_fresh_forward_max_diff": all_max(floored_diff)}


def main():
    out_json, workdir, layouts = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    distributed.init_distributed(ParallelConfig(), seed=7)
    reference = build(ParallelConfig())
    save_model(reference, workdir / "policy")
    ref_greedy, ref_diffs = rollouts(reference)
    results = {"tp1pp1": {**ref_diffs, "response_lengths": ref_greedy.response_lengths.tolist()}}
    for name in layouts:
        chunks = build(parse_layout(name))
        load_model(chunks, workdir / "policy")
        flags = sequence_parallel_flags(chunks)
        greedy, diffs = rollouts(chunks)
        diffs["sequence_parallel_flags_restored"] = (sequence_parallel_flags(chunks) == flags
                                                     and (sum(flags) > 0) == name.endswith("sp"))
        same = (greedy.tokens.shape == ref_greedy.tokens.shape
                and torch.equal(greedy.tokens, ref_greedy.tokens))
        results[name] = {"greedy_tokens_equal": bool(same),
                         "greedy_logprob_max_diff": (greedy.logprobs - ref_greedy.logprobs)
                         .abs().max().item() if same else -1.0, **diffs}
    if distributed.is_rank0():
        Path(out_json).write_text(json.dumps(results, indent=2))
    distributed.shutdown()


if __name__ == "__main__":
    main()
