#!/usr/bin/env python
"""Export a megatron_dvpo checkpoint (converted or trained) as a Hugging Face directory.

    python tools/convert_megatron_to_hf.py --ckpt DIR --out DIR [--max-shard-gb 2] [--overwrite]

Policies come back as *ForCausalLM weights (tied embeddings stay tied); a GVM comes back as the
trunk plus its value head under TRL's names, v_head.summary.{weight,bias}.
"""

import argparse
import sys

from megatron_dvpo.conversion.convert import export_hf, run_cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="megatron_dvpo checkpoint directory")
    parser.add_argument("--out", required=True, help="output HF directory")
    parser.add_argument("--max-shard-gb", type=float, default=2.0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    return run_cli(export_hf, args.ckpt, args.out, overwrite=args.overwrite,
                   max_shard_bytes=int(args.max_shard_gb * 1024 ** 3))


if __name__ == "__main__":
    sys.exit(main())
