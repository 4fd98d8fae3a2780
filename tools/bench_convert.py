#!/usr/bin/env python
"""Benchmark HF <-> megatron conversion: peak RSS against the largest tensor group, and time.

    python tools/bench_convert.py --out bench_convert.json [--shape llama3.2_1b|mixtral_2b|tiny]

Builds a randomly initialised HF Llama (or Mixtral, a mixture of experts) of the given shape
locally (no download), then converts it to megatron and back, each in a fresh process whose
resident memory is sampled every few milliseconds. Writes JSON with, per direction: seconds,
baseline RSS (after imports), peak RSS, the peak's increase over the baseline, and that
increase divided by the largest single tensor group (the target is <= 1.5 for import).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    # meta-llama/Llama-3.2-1B: 1.24B parameters, tied embeddings
    "llama3.2_1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                        vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                        tie_word_embeddings=True,
                        rope_scaling={"rope_type": "llama3", "factor": 32.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192}),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                 max_position_embeddings=128),
    # a mixture of experts: Mixtral's layout at 2.6B parameters (8 layers of 8 experts, top-2)
    "mixtral_2b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                       num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
                       max_position_embeddings=4096, num_local_experts=8,
                       num_experts_per_tok=2, sliding_window=None),
    "mixtral_tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                         max_position_embeddings=128, num_local_experts=4,
                         num_experts_per_tok=2, sliding_window=None),
}

# Runs in a fresh interpreter: imports first, then the baseline, then the measured work, through
# the converters' command-line entry (which also sets how glibc returns freed memory).
_MEASURE = r"""
import json, sys, time
from megatron_dvpo.conversion.convert import export_hf, import_hf, run_cli
from megatron_dvpo.logging import PeakRSS
direction, src, dst = sys.argv[1:4]
with PeakRSS() as rss:
    start = time.perf_counter()
    if direction == "import":
        run_cli(import_hf, src, dst, overwrite=True)
    else:
        run_cli(export_hf, src, dst, overwrite=True, max_shard_bytes=int(sys.argv[4]))
    seconds = time.perf_counter() - start
print("RESULT " + json.dumps({"seconds": seconds, "baseline_rss": rss.baseline,
                              "peak_rss": rss.peak}))
"""


def build_hf(shape: str, directory: Path) -> dict:
    """Save a random model of ``shape`` in bf16; returns its tensor sizes."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    family = "Mixtral" if shape.startswith("mixtral") else "Llama"
    config = getattr(tf, f"{family}Config")(**SHAPES[shape], dtype=torch.bfloat16)
    model = getattr(tf, f"{family}ForCausalLM")(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    params = list(model.parameters())  # tied weights once
    return {"parameters": sum(p.numel() for p in params),
            "bytes": sum(p.numel() * p.element_size() for p in params)}


def largest_group_bytes(ckpt: Path) -> tuple[str, int]:
    """The largest megatron parameter (the unit the converter holds at once) and its size."""
    from megatron_dvpo.config import load_config

    cfg = load_config(ckpt / "config.yaml")
    model = cfg.model
    bytes_per = 4 if cfg.precision.params_dtype == "fp32" else 2
    head_dim, groups = model.head_dim, model.query_groups
    ffn = model.expert_ffn_size if model.num_experts else model.ffn_size
    numel = {  # an MoE's experts are one parameter each, of the dense MLP's shapes
        "embedding": model.padded_vocab_size * model.hidden_size,
        "linear_qkv": (model.num_attention_heads + 2 * groups) * head_dim * model.hidden_size,
        "linear_fc1": 2 * ffn * model.hidden_size,
        "linear_fc2": ffn * model.hidden_size,
        "router": (model.num_experts or 0) * model.hidden_size,
    }
    name = max(numel, key=numel.get)
    return name, numel[name] * bytes_per


def measure(direction: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _MEASURE, direction, *args],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{direction} failed:\n{proc.stderr[-4000:]}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3.2_1b")
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    parser.add_argument("--max-shard-mb", type=int, default=512)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        model = build_hf(args.shape, tmp / "hf")
        build_seconds = time.perf_counter() - start
        result = {"shape": args.shape, **model, "hf_build_seconds": build_seconds}
        result["import"] = measure("import", str(tmp / "hf"), str(tmp / "megatron"))
        group, group_bytes = largest_group_bytes(tmp / "megatron")
        result["largest_tensor_group"] = {"name": group, "bytes": group_bytes}
        result["export"] = measure("export", str(tmp / "megatron"), str(tmp / "hf_back"),
                                   str(args.max_shard_mb * 2**20))
        result["export"]["max_shard_bytes"] = args.max_shard_mb * 2**20
        for direction in ("import", "export"):
            r = result[direction]
            r["peak_increase"] = r["peak_rss"] - r["baseline_rss"]
            r["increase_over_largest_group"] = r["peak_increase"] / group_bytes
            r["gib_per_s"] = model["bytes"] / 2**30 / r["seconds"]
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
