"""Pairwise accuracy of a Global Value Model on held-out preference pairs (docs/algorithm.md §1).

    torchrun --nproc-per-node N -m megatron_dvpo.gvm.evaluate --ckpt DIR --data PATH
        [--tokenizer PATH] [--out results.json] [key=value ...]

``--ckpt`` is a converted or trained checkpoint directory (config.yaml + model/). Prints a table
of accuracies for the last value, the mean and the 1/5/10/90/95/99th percentiles of each
response's per-token values, and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from megatron.core import parallel_state

from megatron_dvpo import distributed
from megatron_dvpo.data.dataset import ValueDataset, collate
from megatron_dvpo.device import to_device
from megatron_dvpo.gvm.heads import mean_value
from megatron_dvpo.gvm.metrics import format_accuracy_table, response_statistics
from megatron_dvpo.gvm.td import gather_response_values
from megatron_dvpo.models import forward

STATISTICS = ("last", "mean", "p1", "p5", "p10", "p90", "p95", "p99")


def q_views(chunks, dataset: ValueDataset, indices: Sequence[int], seq_length: int,
            micro_batch_size: int, transform=None, alignment: str = "qview",
            rows_per_call: int = 1024) -> Iterator[tuple]:
    """``(q, mask)`` of the Q-view (a K-head GVM's mean) of ``indices``' samples,
    ``rows_per_call`` at a time, in
    order (on the last pipeline stage; ``(None, None)`` elsewhere). ``transform(index,
    sample)`` may rewrite each sample first (trajectory conditioning)."""
    for start in range(0, len(indices), rows_per_call):
        chunk = [int(i) for i in indices[start:start + rows_per_call]]
        samples = [dataset[i] if transform is None else transform(i, dataset[i]) for i in chunk]
        samples += samples[:-len(samples) % micro_batch_size]  # whole microbatches
        batch = collate(samples, seq_length, dataset.pad_id)
        values = forward.token_values(chunks, forward.make_microbatches(
            micro_batch_size, tokens=to_device(batch)["tokens"]))
        if values is None:
            yield None, None
            continue
        q, mask, _ = gather_response_values(mean_value(values), batch["prompt_lengths"],
                                            batch["response_lengths"], alignment)
        yield q[:len(chunk)], mask[:len(chunk)]


def evaluate_pairs(chunks, dataset: ValueDataset, pairs: np.ndarray, seq_length: int,
                   micro_batch_size: int, transform=None,
                   alignment: str = "qview") -> dict[str, float]:
    """Accuracy per statistic over ``pairs`` ([P, 2] chosen/rejected indices), on every rank.

    Pairs are split over data-parallel replicas; ties count half (see ``pairwise_accuracy``).
    The statistics are of the Q-view as the GVM was trained to produce it (``alignment``).
    """
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    mine = pairs[dp_rank::dp_size].reshape(-1)  # chosen, rejected, ...
    correct = {name: 0.0 for name in STATISTICS}
    on_last_stage = parallel_state.is_pipeline_last_stage()
    for q, mask in q_views(chunks, dataset, mine, seq_length, micro_batch_size, transform,
                           alignment, rows_per_call=128 * micro_batch_size):
        if q is None:
            continue
        stats = response_statistics(q, mask)
        for name in STATISTICS:
            chosen, rejected = stats[name][0::2], stats[name][1::2]
            correct[name] += ((chosen > rejected).float().sum()
                              + 0.5 * (chosen == rejected).float().sum()).item()
    totals = distributed.sum_over_replicas(list(STATISTICS), correct if on_last_stage else None)
    return {name: totals[name] / max(len(pairs), 1) for name in STATISTICS}


def open_inputs(ckpt_arg: str, data: str, tokenizer_arg: str | None, overrides: list[str]):
    """``(checkpoint dir, its config, the dataset, the tokenizer path)`` of a value-model job on
    a dataset, checked before any process group exists."""
    from megatron_dvpo.checkpointing import resolve_checkpoint_dir
    from megatron_dvpo.config import ConfigError, load_config, validate_parallel
    from megatron_dvpo.data.preference import ReadOptions
    from megatron_dvpo.data.preprocess import open_dataset
    from megatron_dvpo.data.tokenizer import check_vocab, load_tokenizer

    ckpt = resolve_checkpoint_dir(ckpt_arg, "--ckpt")
    cfg = load_config(ckpt / "config.yaml", overrides)
    if not cfg.model.value_head:
        raise ConfigError(f"--ckpt {ckpt} holds a policy, not a value model (model.value_head "
                          "is false)")
    validate_parallel(cfg.parallel, distributed.launch_env().world_size)
    tokenizer = tokenizer_arg or cfg.data.tokenizer or (ckpt / "tokenizer")
    dataset = open_dataset(data, tokenizer, Path(cfg.logging.run_dir) / "data",
                           ReadOptions(max_length=cfg.data.max_length or cfg.data.seq_length,
                                       length_mode=cfg.data.length_mode))
    check_vocab(load_tokenizer(tokenizer), cfg.model.vocab_size, f"--ckpt {ckpt}")
    return ckpt, cfg, dataset, tokenizer


def load_value_model(ckpt: Path, cfg):
    from megatron_dvpo.checkpointing import load_model
    from megatron_dvpo.models import build_chunks

    distributed.init_distributed(cfg.parallel, cfg.seed)
    chunks = build_chunks(cfg, initialize=False)
    load_model(chunks, ckpt / "model")
    return chunks


def main(argv=None) -> None:
    from megatron_dvpo.errors import input_errors_exit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint or save directory")
    parser.add_argument("--data", required=True, help="preprocessed prefix or .jsonl")
    parser.add_argument("--tokenizer", default=None, help="default: <ckpt>/tokenizer or config")
    parser.add_argument("--out", default=None, help="JSON output (default: <ckpt>/eval.json)")
    parser.add_argument("--max-pairs", type=int, default=0)
    parser.add_argument("overrides", nargs="*",
                        help="key=value, e.g. parallel.tensor_model_parallel_size=2")
    args = parser.parse_args(argv)
    with input_errors_exit():
        ckpt, cfg, dataset, _ = open_inputs(args.ckpt, args.data, args.tokenizer, args.overrides)
    chunks = load_value_model(ckpt, cfg)
    pairs = dataset.pairs()
    if args.max_pairs:
        pairs = pairs[:args.max_pairs]
    accuracy = evaluate_pairs(chunks, dataset, pairs, cfg.data.seq_length,
                              cfg.data.micro_batch_size, alignment=cfg.gvm.alignment)
    if distributed.is_rank0():
        print(format_accuracy_table(accuracy, len(pairs)))
        out = Path(args.out) if args.out else ckpt / "eval.json"
        out.write_text(json.dumps({"pairs": int(len(pairs)), "accuracy": accuracy}, indent=2))
        print(f"wrote {out}")
    distributed.shutdown()


if __name__ == "__main__":
    main()
