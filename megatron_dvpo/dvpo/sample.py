"""Sample a policy's responses to prompts; optionally score them into preference pairs.

    torchrun --nproc-per-node N -m megatron_dvpo.dvpo.sample --policy DIR --prompts FILE
        --out rows.jsonl [--pairs --true-reward synthetic:0] [--max-new-tokens 16 ...]

With ``--pairs``, two responses per prompt are scored by the hidden rule and written as
``{prompt, chosen, rejected}`` (ties skipped): preference data from the policy's own samples, on
which a GVM can be trained.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from megatron.core import parallel_state

from megatron_dvpo import distributed
from megatron_dvpo.checkpointing import load_model
from megatron_dvpo.config import load_config
from megatron_dvpo.data.prompts import load_prompts
from megatron_dvpo.data.tokenizer import load_tokenizer
from megatron_dvpo.dvpo.train import checkpoint_tokenizer
from megatron_dvpo.models import build_chunks
from megatron_dvpo.models.generation import SamplingConfig, generate


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True, help="policy checkpoint directory")
    parser.add_argument("--prompts", required=True, help="JSONL with prompt/question/messages")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokenizer", default=None,
                        help="default: the policy checkpoint's tokenizer")
    parser.add_argument("--pairs", action="store_true")
    parser.add_argument("--true-reward", default=None, help="synthetic:<rule seed>")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. parallel layout")
    args = parser.parse_args(argv)
    if args.pairs and not args.true_reward:
        parser.error("--pairs needs --true-reward to rank the two responses")
    policy = Path(args.policy)
    cfg = load_config(policy / "config.yaml", args.overrides)
    distributed.init_distributed(cfg.parallel, args.seed)
    tokenizer = load_tokenizer(args.tokenizer or str(checkpoint_tokenizer(policy)))
    chunks = build_chunks(cfg, initialize=False)
    load_model(chunks, policy / "model")
    prompts, _ = load_prompts(args.prompts, tokenizer, cfg.model.max_position_embeddings)
    score = None
    if args.true_reward:
        from megatron_dvpo.data.synthetic import SyntheticRule

        score = SyntheticRule(seed=int(args.true_reward.split(":")[1])).score
    sampling = SamplingConfig(args.max_new_tokens, args.temperature)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    mine = prompts[dp_rank::dp_size]
    copies = 2 if args.pairs else 1
    rows = []
    for start in range(0, len(mine), args.batch_size):
        batch = [p for p in mine[start:start + args.batch_size] for _ in range(copies)]
        rollout = generate(chunks, [p.ids for p in batch], sampling, tokenizer.eos_id,
                           tokenizer.pad_id, cfg.model.vocab_size,
                           seed=args.seed * 7919 + start * 31 + dp_rank)
        texts = [tokenizer.decode([t for t in r[:n].tolist() if t != tokenizer.eos_id])
                 for r, n in zip(rollout.responses, rollout.response_lengths.tolist())]
        for i in range(0, len(batch), copies):
            prompt = batch[i].text
            if not args.pairs:
                row = {"prompt": prompt, "response": texts[i]}
                if score:
                    row["score"] = score(prompt, texts[i])
                rows.append(row)
                continue
            a, b = texts[i], texts[i + 1]
            sa, sb = score(prompt, a), score(prompt, b)
            if sa != sb and a.strip() and b.strip():
                rows.append({"prompt": prompt, "chosen": a if sa > sb else b,
                             "rejected": b if sa > sb else a})
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, rows if parallel_state.get_tensor_model_parallel_rank() == 0
                                        and parallel_state.is_pipeline_first_stage() else [])
    if distributed.is_rank0():
        with open(args.out, "w") as f:
            for part in gathered:
                for row in part:
                    f.write(json.dumps(row) + "\n")
        print(f"wrote {sum(len(p) for p in gathered)} rows to {args.out}")
    distributed.shutdown()


if __name__ == "__main__":
    main()
