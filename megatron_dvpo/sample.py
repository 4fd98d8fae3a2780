"""Sample a policy's responses to prompts; optionally score them into preference pairs.

    torchrun --nproc-per-node N -m megatron_dvpo.sample --policy DIR --prompts FILE
        --out rows.jsonl [--pairs --true-reward synthetic:0] [--max-new-tokens 16 ...]

With ``--pairs``, two responses per prompt are scored by the hidden rule and written as
``{prompt, chosen, rejected}`` (ties skipped): preference data from the policy's own samples, on
which a GVM can be trained.
"""

from __future__ import annotations

import argparse
import json

import torch
from megatron.core import parallel_state

from megatron_dvpo import distributed
from megatron_dvpo.checkpointing import load_model, resolve_checkpoint_dir
from megatron_dvpo.config import ConfigError, load_config, validate_parallel
from megatron_dvpo.data.prompts import load_prompts
from megatron_dvpo.data.tokenizer import check_vocab, load_tokenizer
from megatron_dvpo.rl.inputs import checkpoint_tokenizer
from megatron_dvpo.errors import input_errors_exit
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
    with input_errors_exit():
        policy = resolve_checkpoint_dir(args.policy, "--policy")
        cfg = load_config(policy / "config.yaml", args.overrides)
        validate_parallel(cfg.parallel, distributed.launch_env().world_size)
        tokenizer_path = args.tokenizer or checkpoint_tokenizer(policy)
        if tokenizer_path is None:
            raise ConfigError(f"--policy {policy} names no tokenizer: pass --tokenizer")
        tokenizer = load_tokenizer(tokenizer_path)
        check_vocab(tokenizer, cfg.model.vocab_size, f"--policy {policy}")
        room = cfg.model.max_position_embeddings - args.max_new_tokens
        if room < 2:
            raise ConfigError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a "
                              f"prompt in model.max_position_embeddings="
                              f"{cfg.model.max_position_embeddings}")
        prompts, counts = load_prompts(args.prompts, tokenizer, room)
        score = None
        if args.true_reward:
            from megatron_dvpo.data.synthetic import SyntheticRule

            score = SyntheticRule(seed=int(args.true_reward.split(":")[1])).score
    distributed.init_distributed(cfg.parallel, args.seed)
    if counts["too_long"]:
        distributed.print_rank0(f"skipped {counts['too_long']} prompts longer than {room} "
                                f"tokens (max_position_embeddings - --max-new-tokens)")
    chunks = build_chunks(cfg, initialize=False)
    load_model(chunks, policy / "model")
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
