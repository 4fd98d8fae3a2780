#!/usr/bin/env python
"""Peak memory of one policy-update microbatch: the lean log-prob head against the full one.

    python tools/bench_memory.py --out bench_memory.json [--vocab 128256 --seq 1024 ...]

A policy with a 128k vocabulary (the Llama-3 tokenizer's) and a small trunk, so that the head
is what a microbatch's memory is made of, runs one forward-backward of the clipped policy loss
(with the entropy, as every RL update logs it) on a ``--prompt``-token prompt plus a
``--seq - --prompt``-token response, in a fresh process per variant, its resident memory
sampled every 2 ms:

- ``full``: the head over every position at once (the code before the lean head);
- ``lean``: the response's positions only, in chunks of ``LOGPROB_CHUNK`` recomputed in the
  backward pass.

It writes each variant's peak increase over the process's baseline (the model built and the
batch made) and the ratio lean / full, in one run.
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
from megatron_dvpo.logging import PeakRSS
from megatron_dvpo.models import forward
from megatron_dvpo.models.gpt import build_model_chunks
from megatron_dvpo.rl.losses import ppo_policy_loss

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
    loss, _ = ppo_policy_loss(logp, logp_old, advantages, mask, 0.2, normalizer=mask.sum())
    return loss, {}

with PeakRSS() as rss:
    start = time.perf_counter()
    forward.run_microbatches(chunks, forward.make_microbatches(mbs, tokens=tokens), head,
                             loss_fn)
    seconds = time.perf_counter() - start
print("RESULT " + json.dumps({"seconds": seconds, "baseline_rss": rss.baseline,
                              "peak_increase": rss.peak - rss.baseline}))
"""


def measure(variant: str, args) -> dict:
    proc = subprocess.run([sys.executable, "-c", _MEASURE, variant, str(args.vocab),
                           str(args.seq), str(args.prompt), str(args.micro_batch)],
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
    parser.add_argument("--quick", action="store_true", help="small shapes (tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.vocab, args.seq, args.prompt = 8192, 384, 128
    result = {"config": {k: v for k, v in vars(args).items() if k != "out"}}
    for variant in ("full", "lean"):
        result[variant] = measure(variant, args)
    result["lean_over_full"] = result["lean"]["peak_increase"] / result["full"]["peak_increase"]
    result["target"] = {"lean_over_full_at_most": 0.35}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
