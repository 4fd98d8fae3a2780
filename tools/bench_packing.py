#!/usr/bin/env python
"""Training tokens/s on a length-skewed batch: token-budget microbatches against fixed ones.

    python tools/bench_packing.py --out bench_packing.json [--quick]

One random policy (``--layers`` x ``--hidden``) takes forward-backward steps of the SFT loss on
the same batch twice, in one process: with ``data.micro_batch_size`` rows per microbatch padded
to the batch's width (the default), and with ``data.micro_batch_tokens`` (rows sorted by length,
each microbatch cut to its longest row). Most rows are short and a few are long, as responses
are. It reports real (unpadded) tokens/s of each, their ratio (issue 16's target: >= 1.5), and
the largest gradient difference between the two (the loss is normalised by the batch's token
count, so the gradients are the same).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def skewed_lengths(rows: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """Three rows in four short (an eighth to a quarter of ``width``), the rest up to full."""
    short = torch.randint(width // 8, width // 4 + 1, (rows,), generator=generator)
    long = torch.randint(width // 2, width + 1, (rows,), generator=generator)
    return torch.where(torch.rand(rows, generator=generator) < 0.75, short, long)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.vocab, args.rows, args.width, args.steps = \
            2, 64, 256, 8, 64, 1
    from megatron_dvpo.config import ParallelConfig, load_config
    from megatron_dvpo.distributed import init_distributed, shutdown
    from megatron_dvpo.models import forward
    from megatron_dvpo.models.gpt import build_model_chunks

    init_distributed(ParallelConfig(), seed=1234)
    budget = args.micro_batch_size * args.width  # the fixed microbatches' own token count
    cfg = load_config(None, [f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}",
                             f"model.ffn_hidden_size={4 * args.hidden}",
                             "model.num_attention_heads=4", "model.num_query_groups=2",
                             f"model.vocab_size={args.vocab}",
                             f"model.max_position_embeddings={args.width}"])
    chunks = build_model_chunks(cfg)
    g = torch.Generator().manual_seed(0)
    lengths = skewed_lengths(args.rows, args.width, g)
    tokens = torch.randint(0, args.vocab, (args.rows, args.width), generator=g)
    scored = torch.arange(args.width - 1)[None, :] < (lengths - 1)[:, None]
    total = float(scored.sum())
    head = forward.policy_logprobs_head(args.vocab, chunk=forward.LOGPROB_CHUNK)

    def loss_fn(outputs, mb):
        return -(outputs["logprobs"] * mb["scored"]).sum() / total, {}

    def run(micro_batch_tokens: int) -> tuple[float, torch.Tensor]:
        microbatches = forward.split_microbatches(args.micro_batch_size, micro_batch_tokens,
                                                  lengths, tokens=tokens, scored=scored)
        seconds = []
        for _ in range(args.steps + 1):  # the first is a warm-up
            for chunk in chunks:
                chunk.zero_grad()
            start = time.perf_counter()
            forward.run_microbatches(chunks, microbatches, head, loss_fn)
            seconds.append(time.perf_counter() - start)
        grads = torch.cat([p.grad.flatten() for p in chunks[0].parameters()])
        return min(seconds[1:]), grads

    try:
        padded_s, padded_grads = run(0)
        budget_s, budget_grads = run(budget)
    finally:
        shutdown()
    real = int(lengths.sum())
    report = {"config": {k: v for k, v in vars(args).items() if k != "out"},
              "micro_batch_tokens": budget, "real_tokens": real,
              "padded_tokens": args.rows * args.width,
              "padded": {"step_s": padded_s, "tokens_per_s": real / padded_s},
              "token_budget": {"step_s": budget_s, "tokens_per_s": real / budget_s},
              "speedup": padded_s / budget_s,
              "grad_max_abs_diff": (padded_grads - budget_grads).abs().max().item(),
              "grad_max_abs": padded_grads.abs().max().item()}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
