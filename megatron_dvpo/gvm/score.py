"""Score every response of a dataset with a value model: ``{prompt, response, score}`` rows.

    torchrun --nproc-per-node N -m megatron_dvpo.gvm.score --ckpt RM_DIR --data rows.jsonl
        --out scored.jsonl [key=value ...]

The score is the model's final value (``q_{T-1}``; for a Bradley-Terry reward model, its
reward). This is the paper's first route to a GVM (docs/algorithm.md §1): a reward model scores
the policy's samples, and the GVM learns TD(lambda) targets from those scores.
"""

from __future__ import annotations

import argparse

from megatron.core import parallel_state

from megatron_dvpo import distributed
from megatron_dvpo.data.tokenizer import load_tokenizer
from megatron_dvpo.errors import input_errors_exit
from megatron_dvpo.gvm.evaluate import load_value_model, open_inputs, q_views


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="value model checkpoint or save directory")
    parser.add_argument("--data", required=True, help="preprocessed prefix or .jsonl")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokenizer", default=None, help="default: <ckpt>/tokenizer or config")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. the parallel layout")
    args = parser.parse_args(argv)
    with input_errors_exit():
        ckpt, cfg, dataset, tokenizer_path = open_inputs(args.ckpt, args.data, args.tokenizer,
                                                         args.overrides)
    tokenizer = load_tokenizer(tokenizer_path)
    chunks = load_value_model(ckpt, cfg)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    mine = list(range(len(dataset)))[dp_rank::dp_size]
    scores = []
    for q, mask in q_views(chunks, dataset, mine, cfg.data.seq_length,
                           cfg.data.micro_batch_size, alignment=cfg.gvm.alignment):
        if q is not None:
            scores += q.gather(1, (mask.sum(1) - 1).unsqueeze(1)).squeeze(1).tolist()
    writes = (parallel_state.is_pipeline_last_stage()
              and parallel_state.get_tensor_model_parallel_rank() == 0)
    gathered = distributed.gather_lists(list(zip(mine, scores)), writes)
    special = {tokenizer.bos_id, tokenizer.eos_id}

    def text(ids: list[int]) -> str:
        return tokenizer.decode([t for t in ids if t not in special])

    rows = [{"prompt": text(dataset[i].prompt_ids), "response": text(dataset[i].response_ids),
             "score": score} for i, score in sorted(gathered)] if distributed.is_rank0() else []
    distributed.write_jsonl_rank0(args.out, rows, "scored rows")
    distributed.shutdown()


if __name__ == "__main__":
    main()
