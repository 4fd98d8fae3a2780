"""Sample a policy's responses to prompts; optionally score them into preference pairs.

    torchrun --nproc-per-node N -m megatron_dvpo.sample --policy DIR --prompts FILE
        --out rows.jsonl [--samples-per-prompt K] [--scorer SPEC] [--pairs]
        [--guide-gvm DIR --guide-beta B --guide-top-k K] [--max-new-tokens 16 ...]

Writes one row per sample, in the input's order, keeping each input row's own fields (an id,
say): ``{..., prompt, response, sample}`` plus ``score`` with ``--scorer``; such rows train SFT,
and with a score a GVM. With ``--pairs``, two responses per prompt are ranked by the scorer and
written as ``{..., prompt, chosen, rejected}`` (ties skipped): preference data from the policy's
own samples, on which a GVM can be trained. With ``--guide-gvm DIR`` a frozen GVM steers the
sampling (``models/guided.py``: the policy's ``--guide-top-k`` candidates' logits shifted by
``--guide-beta`` times their value against the candidates' mean).
"""

from __future__ import annotations

import argparse

from megatron.core import parallel_state

from megatron_dvpo import distributed
from megatron_dvpo.checkpointing import load_model, resolve_checkpoint_dir
from megatron_dvpo.config import ConfigError, load_config, validate_parallel
from megatron_dvpo.data.preference import DATA_KEYS
from megatron_dvpo.data.prompts import load_prompts
from megatron_dvpo.data.tokenizer import check_vocab, load_tokenizer
from megatron_dvpo.rl.inputs import checkpoint_tokenizer
from megatron_dvpo.errors import input_errors_exit
from megatron_dvpo.rl.rewards import load_scorer
from megatron_dvpo.rl.scorers import frozen_model
from megatron_dvpo.models import build_chunks
from megatron_dvpo.models.generation import SamplingConfig, generate
from megatron_dvpo.models.guided import GuideConfig, ValueGuide, check_guide


def sample_rows(chunks, prompts: list, tokenizer, sampling: SamplingConfig, vocab_size: int,
                n: int, batch_size: int, seed: int, guide_gvm=None,
                guide: GuideConfig | None = None) -> list[tuple[int, int, str]]:
    """``(prompt index, sample index, response text)`` for ``n`` samples of each prompt, steered
    by ``guide_gvm`` when given."""
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = [(p, k) for p in prompts[start:start + batch_size] for k in range(n)]
        rollout = generate(chunks, [p.ids for p, _ in batch], sampling, tokenizer.eos_id,
                           tokenizer.pad_id, vocab_size, seed=seed * 7919 + start * 31,
                           guide=ValueGuide(guide_gvm, guide) if guide_gvm else None)
        for (prompt, k), response, length in zip(batch, rollout.responses,
                                                 rollout.response_lengths.tolist()):
            text = tokenizer.decode([t for t in response[:length].tolist()
                                     if t != tokenizer.eos_id])
            out.append((prompt.index, k, text))
    return out


def output_rows(prompts: list, samples: list[tuple[int, int, str]], score, pairs: bool
                ) -> list[dict]:
    """Rows in input order: each input row's own fields (not its data keys), then ``prompt`` and
    either one
    ``response`` (+ ``score`` and ``sample``) per sample, or ``chosen``/``rejected`` of the
    first two samples ranked by ``score`` (ties, and empty responses, which preference data
    refuses, are skipped)."""
    by_prompt: dict[int, list[str]] = {}
    for index, k, text in sorted(samples):
        by_prompt.setdefault(index, []).append(text)
    rows = []
    for prompt in sorted(prompts, key=lambda p: p.index):
        base = {**{k: v for k, v in prompt.row.items() if k not in DATA_KEYS},
                "prompt": prompt.text}
        texts = by_prompt.get(prompt.index, [])
        if not pairs:
            for k, text in enumerate(texts):
                extra = {"score": score(prompt.text, text)} if score else {}
                rows.append({**base, "response": text, "sample": k, **extra})
            continue
        a, b = texts[:2]
        sa, sb = score(prompt.text, a), score(prompt.text, b)
        if sa != sb and a.strip() and b.strip():
            chosen, rejected = (a, b) if sa > sb else (b, a)
            rows.append({**base, "chosen": chosen, "rejected": rejected})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True, help="policy checkpoint or save directory")
    parser.add_argument("--prompts", required=True, help="JSONL with prompt/question/messages")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokenizer", default=None,
                        help="default: the policy checkpoint's tokenizer")
    # not --n alone: under torchrun, whose parser takes every option, it is ambiguous
    parser.add_argument("--samples-per-prompt", "--n", dest="n", type=int, default=1,
                        help="samples per prompt")
    parser.add_argument("--pairs", action="store_true",
                        help="two samples per prompt, ranked by --scorer into preference rows")
    parser.add_argument("--scorer", "--true-reward", dest="scorer", default=None,
                        help="synthetic:<seed>, bigram:<seed>, module:function or "
                             "file.py:function (see megatron_dvpo/rl/rewards.py)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guide-gvm", default=None,
                        help="a GVM checkpoint that steers sampling (GVM-guided decoding)")
    parser.add_argument("--guide-beta", type=float, default=1.0)
    parser.add_argument("--guide-top-k", type=int, default=8)
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. parallel layout")
    args = parser.parse_args(argv)
    if args.pairs and not args.scorer:
        parser.error("--pairs needs --scorer to rank the two responses")
    if args.n < 1 or args.batch_size < 1 or args.guide_top_k < 1:
        parser.error("--samples-per-prompt, --batch-size and --guide-top-k must be >= 1")
    n = 2 if args.pairs else args.n
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
        score = load_scorer(args.scorer, "--scorer")
        guide_dir = (resolve_checkpoint_dir(args.guide_gvm, "--guide-gvm") if args.guide_gvm
                     else None)
        guide_cfg = load_config(guide_dir / "config.yaml") if guide_dir else None
        if guide_cfg is not None:
            check_guide(guide_cfg, cfg, f"--guide-gvm {guide_dir}")
    distributed.init_distributed(cfg.parallel, args.seed)
    if counts["too_long"]:
        distributed.print_rank0(f"skipped {counts['too_long']} prompts longer than {room} "
                                f"tokens (max_position_embeddings - --max-new-tokens)")
    chunks = build_chunks(cfg, initialize=False)
    load_model(chunks, policy / "model")
    guide_gvm = frozen_model(cfg, guide_cfg.model, str(guide_dir)) if guide_dir else None
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    samples = sample_rows(chunks, prompts[dp_rank::dp_size], tokenizer,
                          SamplingConfig(args.max_new_tokens, args.temperature),
                          cfg.model.vocab_size, n, args.batch_size, args.seed * 131 + dp_rank,
                          guide_gvm, GuideConfig(args.guide_beta, args.guide_top_k))
    writes = (parallel_state.get_tensor_model_parallel_rank() == 0
              and parallel_state.is_pipeline_first_stage())
    gathered = distributed.gather_lists(samples, writes)
    if distributed.is_rank0():
        distributed.write_jsonl_rank0(args.out, output_rows(prompts, gathered, score, args.pairs),
                                      "rows")
    distributed.shutdown()


if __name__ == "__main__":
    main()
