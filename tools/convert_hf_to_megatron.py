#!/usr/bin/env python
"""Convert a Hugging Face checkpoint of a known family (Llama, Mistral, Qwen2, Qwen3, Mixtral,
Qwen2-MoE, Qwen3-MoE) into a megatron_dvpo checkpoint.

    python tools/convert_hf_to_megatron.py --hf DIR --out DIR [--tp N --pp M --ep E]
        [--target policy|gvm] [--dtype fp32|bf16|fp16] [--overwrite]

The output is a megatron-core dist checkpoint that loads at any TP/PP/EP; --tp/--pp/--ep set
the layout recorded in its config.yaml and are checked against the model's shape. --target gvm
builds a Global Value Model: a zero-initialised value head, or the checkpoint's own value/reward
head (TRL v_head.summary.*, score.weight, or a [1, hidden] lm_head/reward_head) when it has one.
"""

import argparse
import sys

from megatron_dvpo.conversion.convert import import_hf, run_cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf", required=True, help="HF directory (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="output checkpoint directory")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size to record")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to record")
    parser.add_argument("--ep", type=int, default=1,
                        help="expert-parallel size to record (mixtures of experts)")
    parser.add_argument("--target", choices=["policy", "gvm"], default="policy")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                        help="parameter dtype (default: the checkpoint's)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    return run_cli(import_hf, args.hf, args.out, target=args.target, tp=args.tp, pp=args.pp,
                   ep=args.ep, dtype=args.dtype, overwrite=args.overwrite)


if __name__ == "__main__":
    sys.exit(main())
