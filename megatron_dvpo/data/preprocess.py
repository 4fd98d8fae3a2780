"""Tokenize JSONL preference/scored files once into a memory-mapped value dataset.

Usage: python tools/preprocess_data.py --input train.jsonl --tokenizer TOKENIZER --output PREFIX
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Optional, Sequence

from megatron_dvpo.data.dataset import ValueDataset, write_dataset
from megatron_dvpo.data.preference import DataError, DataStats, ReadOptions, iter_samples
from megatron_dvpo.data.tokenizer import load_tokenizer


def preprocess(inputs: Sequence[str | Path], tokenizer_path: str | Path, output: str | Path,
               options: ReadOptions) -> DataStats:
    """Write ``output.{bin,idx.npy,json}`` from ``inputs``; returns the row counts."""
    tokenizer = load_tokenizer(tokenizer_path)
    stats = DataStats()
    write_dataset(output, iter_samples(inputs, tokenizer, options, stats), tokenizer,
                  lambda: {"inputs": [str(p) for p in inputs],
                           "options": dataclasses.asdict(options), "stats": stats.as_dict()})
    return stats


def main(argv: Optional[list[str]] = None) -> DataStats:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", action="append", required=True, type=Path,
                        help="JSONL file (repeat for several)")
    parser.add_argument("--tokenizer", required=True,
                        help="SentencePiece .model file or HF tokenizer directory")
    parser.add_argument("--output", required=True, help="output prefix: PREFIX.bin, ...")
    parser.add_argument("--max-length", type=int, default=None,
                        help="max prompt + response tokens (default: no limit)")
    parser.add_argument("--length-mode", choices=("filter", "truncate"), default="filter")
    parser.add_argument("--skip-bad-rows", action="store_true",
                        help="skip and count malformed rows instead of stopping at the first")
    parser.add_argument("--chosen-reward", type=float, default=1.0)
    parser.add_argument("--rejected-reward", type=float, default=-1.0)
    args = parser.parse_args(argv)
    options = ReadOptions(max_length=args.max_length, length_mode=args.length_mode,
                          chosen_reward=args.chosen_reward, rejected_reward=args.rejected_reward,
                          skip_bad_rows=args.skip_bad_rows)
    stats = preprocess(args.input, args.tokenizer, args.output, options)
    print(json.dumps({"output": args.output, **stats.as_dict()}))
    return stats


def open_dataset(path: str | Path, tokenizer_path: str | Path | None, cache_dir: str | Path,
                 options: ReadOptions) -> ValueDataset:
    """A ``ValueDataset`` from a preprocessed prefix, or from a .jsonl file tokenized once.

    A .jsonl is preprocessed by rank 0 into ``cache_dir`` (reused while newer than the file and
    made with the same options); the other ranks wait, then everyone memory-maps the same files.
    """
    import torch.distributed as dist

    path = Path(path)
    if path.suffix != ".jsonl":
        return ValueDataset(path)
    if tokenizer_path is None:
        raise DataError(f"{path}: a .jsonl dataset needs data.tokenizer to tokenize it")
    prefix = Path(cache_dir) / path.stem
    meta = prefix.with_suffix(".json")
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    fresh = (meta.is_file() and meta.stat().st_mtime >= path.stat().st_mtime
             and json.loads(meta.read_text()).get("options") == dataclasses.asdict(options))
    if rank0 and not fresh:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        preprocess([path], tokenizer_path, prefix, options)
    if dist.is_initialized():
        dist.barrier()
    return ValueDataset(prefix)
