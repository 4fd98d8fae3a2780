#!/usr/bin/env python
"""Peak memory of one policy-update microbatch (the lean log-prob head against the full one)
and of one GVM scoring microbatch (rollout rows without a dense mask against with one).

    python tools/bench_memory.py --out bench_memory.json [--vocab 128256 --seq 1024 ...]

A policy with a 128k vocabulary (the Llama-3 tokenizer's) and a small trunk, so that the head
is what a microbatch's memory is made of, runs one forward-backward of the clipped policy loss
(with the entropy, as every RL update logs it) on a ``--prompt``-token prompt plus a
``--seq - --prompt``-token response, in a fresh process per variant, its resident memory
sampled every 2 ms:

- ``full``: the head over every position at once (the code before the lean head);
- ``lean``: the response's positions only, in chunks of ``LOGPROB_CHUNK`` recomputed in the
  backward pass.

A GVM of ``--score-layers`` x ``--score-hidden`` with ``--score-heads`` attention heads scores
``--score-rows`` left-padded rollout rows of ``--seq`` tokens (a quarter of them padded by up to
half the row), forward only, as DVPO's scoring pass does:

- ``dense_mask``: a [b, 1, s, s] padding mask (the code before issue 16, and sequence
  parallelism's path today), SDPA choosing its kernel (on CPU its flash kernel takes masks);
- ``dense_mask_math``: the same with SDPA held to its math kernel, the one CUDA falls back to
  for a dense mask where its fused kernels cannot take it (the case issue 16 describes);
- ``causal``: each row rotated so its padding sits at its end, plain causal attention;
  and again with ``--value-heads`` value heads (docs/algorithm.md §1): what K heads cost.

It writes each variant's peak increase over the process's baseline (the model built and the
batch made) and the ratios lean / full and causal / each dense-mask variant, in one run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_MEASURE = r"""
import json, sys, time
import torch
from megatron_dvpo import distributed
from megatron_dvpo.config import ParallelConfig, load_config
from megatron_dvpo.logging import PeakRSS, release_freed_memory
from megatron_dvpo.models import forward
from megatron_dvpo.models.gpt import build_model_chunks
from megatron_dvpo.rl.policy_loss import ppo_policy_loss

variant, vocab, seq, prompt, mbs = sys.argv[1], *map(int, sys.argv[2:6])
distributed.init_distributed(ParallelConfig(), seed=0)
cfg = load_config(None, [f"model.vocab_size={vocab}", "model.num_layers=2",
                         "model.hidden_size=64", "model.num_attention_heads=4",
                         f"model.max_position_embeddings={seq}"])
chunks = build_model_chunks(cfg)
tokens = torch.randint(0, vocab, (mbs, seq))
steps = seq - prompt
logp_old, advantages = torch.zeros(mbs, steps), torch.randn(mbs, steps)
mask = torch.ones(mbs, steps, dtype=torch.bool)
lean = variant == "lean"
head = forward.policy_logprobs_head(vocab, 1.0, entropy=True, start=prompt - 1 if lean else 0,
                                    chunk=forward.LOGPROB_CHUNK if lean else 0)

def loss_fn(outputs, batch):
    logp = outputs["logprobs"] if lean else outputs["logprobs"][:, prompt - 1:]
    loss, _ = ppo_policy_loss(logp, logp_old, advantages, mask)
    return loss / mask.sum(), {}

# once before measuring: first-call allocations (thread pools, the schedule's buffers) are not
# the head's, and blurred the quick shape's ratio (0.70-0.92 over runs); what the warm-up freed
# goes back to the system, or the measured run would reuse it unseen
forward.run_microbatches(chunks, forward.make_microbatches(mbs, tokens=tokens), head, loss_fn)
release_freed_memory()
with PeakRSS() as rss:
    start = time.perf_counter()
    forward.run_microbatches(chunks, forward.make_microbatches(mbs, tokens=tokens), head,
                             loss_fn)
    seconds = time.perf_counter() - start
print("RESULT " + json.dumps({"seconds": seconds, "baseline_rss": rss.baseline,
                              "peak_increase": rss.peak - rss.baseline}))
"""


_MEASURE_SCORING = r"""
import contextlib, json, sys, time
import torch
from megatron_dvpo import distributed
from megatron_dvpo.config import ParallelConfig, load_config
from megatron_dvpo.logging import PeakRSS, release_freed_memory
from megatron_dvpo.models import forward
from megatron_dvpo.models.gvm import build_gvm_chunks

variant, seq, rows, layers, hidden, heads, value_heads = sys.argv[1], *map(int, sys.argv[2:8])
distributed.init_distributed(ParallelConfig(), seed=0)
cfg = load_config(None, ["model.vocab_size=1024", f"model.num_layers={layers}",
                         f"model.hidden_size={hidden}", f"model.num_attention_heads={heads}",
                         f"model.ffn_hidden_size={2 * hidden}", "model.value_head=true",
                         f"model.value_heads={value_heads}",
                         f"model.max_position_embeddings={seq}"])
chunks = build_gvm_chunks(cfg, value_head_init_std=0.02)
g = torch.Generator().manual_seed(0)
left_pad = torch.zeros(rows, dtype=torch.long)
left_pad[: max(rows // 4, 1)] = torch.randint(1, seq // 2, (max(rows // 4, 1),), generator=g)
batch = {"tokens": torch.randint(0, 1024, (rows, seq), generator=g), "left_pad": left_pad}
tokens, positions, mask = forward.model_inputs(batch, seq, padding_right=variant == "causal")
def kernel():  # a context manager is entered once: a new one each time
    return (torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH)
            if variant == "dense_mask_math" else contextlib.nullcontext())
with torch.no_grad(), kernel():  # once before measuring, as above
    chunks[0](tokens, positions, mask)
release_freed_memory()
with PeakRSS() as rss, torch.no_grad(), kernel():
    start = time.perf_counter()
    chunks[0](tokens, positions, mask)
    seconds = time.perf_counter() - start
print("RESULT " + json.dumps({"seconds": seconds, "baseline_rss": rss.baseline,
                              "peak_increase": rss.peak - rss.baseline}))
"""


def _run_measure(script: str, variant: str, *numbers: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", script, variant, *map(str, numbers)],
                          capture_output=True, text=True, cwd=REPO,
                          env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin",
                               "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{proc.stderr[-4000:]}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--score-rows", type=int, default=4)
    parser.add_argument("--score-layers", type=int, default=2)
    parser.add_argument("--score-hidden", type=int, default=512)
    parser.add_argument("--score-heads", type=int, default=16)
    parser.add_argument("--value-heads", type=int, default=8,
                        help="the K-head GVM scored beside the one-head one (causal)")
    parser.add_argument("--quick", action="store_true", help="small shapes (tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.vocab, args.seq, args.prompt = 8192, 384, 128
        args.score_hidden, args.score_heads = 128, 4
    result = {"config": {k: v for k, v in vars(args).items() if k != "out"}}
    for variant in ("full", "lean"):
        result[variant] = _run_measure(_MEASURE, variant, args.vocab, args.seq, args.prompt,
                                       args.micro_batch)
    result["lean_over_full"] = result["lean"]["peak_increase"] / result["full"]["peak_increase"]
    shape = (args.seq, args.score_rows, args.score_layers, args.score_hidden, args.score_heads)
    scoring = {variant: _run_measure(_MEASURE_SCORING, variant, *shape, 1)
               for variant in ("dense_mask", "dense_mask_math", "causal")}
    heads = _run_measure(_MEASURE_SCORING, "causal", *shape, args.value_heads)
    result["gvm_scoring"] = {**scoring, **{f"causal_over_{variant}": (
        scoring["causal"]["peak_increase"] / scoring[variant]["peak_increase"])
        for variant in ("dense_mask", "dense_mask_math")},
        f"causal_{args.value_heads}_value_heads": heads,
        "value_heads_over_one": {k: heads[k] / scoring["causal"][k]
                                 for k in ("seconds", "peak_increase")}}
    result["target"] = {"lean_over_full_at_most": 0.35,
                        "causal_over_dense_mask_math_at_most": 0.35}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
