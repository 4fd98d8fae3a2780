#!/usr/bin/env python
"""Our KV-cache sampler against HF ``generate`` on the same weights, prompts and lengths.

    python tools/bench_rollout.py --out bench_rollout.json [--shapes tiny,8x768,100m] [--quick]

For each shape, one random Llama-style model is built in HF format and imported, and both
samplers draw ``--new-tokens`` tokens for every prompt (sampling at temperature 1, no early
stop) at each batch size, in this process, one after the other: new tokens/s each and their
ratio. Issue 16's target on CPU is ours/HF >= 1.0 at the ~100M-parameter shape.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

import torch  # noqa: E402

from bench_dvpo_vs_ppo import build_models  # noqa: E402
from bench_gpu import bench_generation, bench_hf_generate  # noqa: E402

SHAPES = {
    "tiny": ["--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2"],
    "8x768": ["--layers", "8", "--hidden", "768", "--heads", "12", "--kv-heads", "4",
              "--ffn", "2048", "--vocab", "32000"],
    # ~100M parameters: 12 x 768, GQA 12/4, FFN 2048, untied 32k vocabulary
    "100m": ["--layers", "12", "--hidden", "768", "--heads", "12", "--kv-heads", "4",
             "--ffn", "2048", "--vocab", "32000"],
}


def bench_shape(work: Path, shape: str, batches: list[int], args) -> dict:
    from megatron_dvpo.data.tokenizer import load_tokenizer

    models = build_models(work / shape, SHAPES[shape] + ["--dtype", "fp32"])
    vocab = load_tokenizer(str(models["hf"])).vocab_size
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    precision = [f"precision.params_dtype={'bf16' if torch.cuda.is_available() else 'fp32'}"]
    rows = {}
    for batch in batches:
        size = SimpleNamespace(gen_batch=batch, gen_prompt_len=args.prompt_len,
                               gen_new_tokens=args.new_tokens)
        print(f"\n== {shape}, batch {batch}", flush=True)
        ours = bench_generation(models["policy"], precision, size, vocab)
        hf = bench_hf_generate(models["hf"], size, vocab, dtype)
        rows[str(batch)] = {"ours": ours, "hf_generate": hf,
                            "ours_over_hf": ours["tokens_per_s"] / hf["tokens_per_s"]}
        print(json.dumps(rows[str(batch)]), flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", default="tiny,8x768,100m")
    parser.add_argument("--batches", default="16,64")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--quick", action="store_true", help="tiny shape and sizes (tests)")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.batches, args.prompt_len, args.new_tokens = "tiny", "4", 8, 8
    if args.threads:
        torch.set_num_threads(args.threads)
    from megatron_dvpo.config import ParallelConfig
    from megatron_dvpo.distributed import init_distributed, shutdown

    batches = [int(b) for b in args.batches.split(",")]
    report = {"config": {k: v for k, v in vars(args).items() if k not in ("out", "workdir")},
              "torch_threads": torch.get_num_threads(), "shapes": {}}
    init_distributed(ParallelConfig(), seed=1234)
    try:
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            for shape in args.shapes.split(","):
                report["shapes"][shape] = bench_shape(Path(tmp), shape, batches, args)
                Path(args.out).write_text(json.dumps(report, indent=2))
    finally:
        shutdown()
    print(json.dumps({s: {b: r["ours_over_hf"] for b, r in rows.items()}
                      for s, rows in report["shapes"].items()}, indent=2))


if __name__ == "__main__":
    main()
