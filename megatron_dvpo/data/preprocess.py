"""Tokenize JSONL preference/scored files once into a memory-mapped value dataset.

Usage: python tools/preprocess_data.py --input train.jsonl --tokenizer TOKENIZER --output PREFIX
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Optional, Sequence

from megatron_dvpo.data.cache import build_once, entry_prefix
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


def prepare_dataset(path: str | Path, tokenizer_path: str | Path | None,
                    cache_dir: str | Path, options: ReadOptions) -> Path:
    """The prefix of a dataset ready to memory-map: a preprocessed prefix as given, or the
    token cache entry of a .jsonl file (tokenized here by one process if it is not built yet;
    see ``data/cache.py`` for the key and the locking)."""
    path = Path(path)
    if path.suffix != ".jsonl":
        return path
    if tokenizer_path is None:
        raise DataError(f"{path}: a .jsonl dataset needs data.tokenizer to tokenize it")
    prefix = entry_prefix(path, tokenizer_path, cache_dir, options)
    return build_once(prefix, lambda: preprocess([path], tokenizer_path, prefix, options),
                      str(path))


def open_dataset(path: str | Path, tokenizer_path: str | Path | None, cache_dir: str | Path,
                 options: ReadOptions) -> ValueDataset:
    """A ``ValueDataset`` from a preprocessed prefix, or from a .jsonl file tokenized once."""
    return ValueDataset(prepare_dataset(path, tokenizer_path, cache_dir, options))
