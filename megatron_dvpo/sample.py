"""Sample a policy's responses to prompts; optionally score them into preference pairs.

    torchrun --nproc-per-node N -m megatron_dvpo.sample --policy DIR --prompts FILE
        --out rows.jsonl [--samples-per-prompt K] [--scorer SPEC]
        [--pairs [--pair-choice first|length_balanced]]
        [--guide-gvm DIR --guide-beta B --guide-top-k K] [--max-new-tokens 16 ...]

Writes one row per sample, in the input's order, keeping each input row's own fields (an id,
say): ``{..., prompt, response, sample}`` plus ``score`` with ``--scorer``; such rows train SFT,
and with a score a GVM. With ``--pairs``, ``--samples-per-prompt`` (at least 2) responses per
prompt are scored and one pair of them written as ``{..., prompt, chosen, rejected}`` (prompts
whose samples all tie skipped): preference data from the policy's own samples, on which a GVM
can be trained. ``--pair-choice length_balanced`` picks the pairs so that the chosen response is
the longer one as often as the shorter (Singhal et al. 2023, "A Long Way to Go"): where the
scorer penalises length, random pairs differ mostly by length and a value model learns nothing
else. With ``--guide-gvm DIR`` a frozen GVM steers the sampling (``models/guided.py``: the
policy's ``--guide-top-k`` candidates' logits shifted by ``--guide-beta`` times their value
against the candidates' mean).
"""

from __future__ import annotations

import argparse
import itertools

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


PAIR_CHOICES = ("first", "length_balanced")


def words_longer(pair: tuple[str, str]) -> int:
    """How many words longer a pair's first response is than its second."""
    return len(pair[0].split()) - len(pair[1].split())


def pick_pair(texts: list[str], scores: list[float], choice: str, longer_wins: bool
              ) -> tuple[str, str] | None:
    """``(chosen, rejected)`` among ``texts``, or None when every non-empty one ties.

    ``first``: the first two samples. ``length_balanced``: the first pair (in sample order) whose
    chosen response is the longer in words when ``longer_wins``, the shorter otherwise; failing
    that a pair of equal length, failing that the first pair that ranks."""
    if choice == "length_balanced":
        candidates = itertools.combinations(range(len(texts)), 2)
    else:
        candidates = [(0, 1)] if len(texts) >= 2 else []
    pairs = [((texts[i], texts[j]) if scores[i] > scores[j] else (texts[j], texts[i]))
             for i, j in candidates
             if scores[i] != scores[j] and texts[i].strip() and texts[j].strip()]
    if not pairs:
        return None

    def rank(pair: tuple[str, str]) -> int:
        longer = words_longer(pair)
        return 0 if longer and (longer > 0) == longer_wins else 1 if longer == 0 else 2

    return min(pairs, key=rank)  # min keeps the first of equal ranks


def length_balance(rows: list[dict]) -> str:
    """How often the longer response of a pair is the chosen one: near 100% (or 0%), length
    alone ranks the pairs."""
    signs = [words_longer((r["chosen"], r["rejected"])) for r in rows]
    longer, shorter, n = sum(d > 0 for d in signs), sum(d < 0 for d in signs), max(len(rows), 1)
    return (f"pairs: the chosen response is the longer in {100 * longer / n:.0f}%, the shorter "
            f"in {100 * shorter / n:.0f}%, as long in "
            f"{100 * (len(rows) - longer - shorter) / n:.0f}%")


def output_rows(prompts: list, samples: list[tuple[int, int, str]], score,
                pair_choice: str | None) -> list[dict]:
    """Rows in input order: each input row's own fields (not its data keys), then ``prompt`` and
    either one ``response`` (+ ``score`` and ``sample``) per sample, or, with a
    ``pair_choice``, the ``chosen``/``rejected`` pair ``pick_pair`` finds (empty responses,
    which preference data refuses, never among them); balanced pairs ask for the longer
    response to win while it has won less often than the shorter."""
    by_prompt: dict[int, list[str]] = {}
    for index, k, text in sorted(samples):
        by_prompt.setdefault(index, []).append(text)
    rows, longer_lead = [], 0
    for prompt in sorted(prompts, key=lambda p: p.index):
        base = {**{k: v for k, v in prompt.row.items() if k not in DATA_KEYS},
                "prompt": prompt.text}
        texts = by_prompt.get(prompt.index, [])
        if pair_choice is None:
            for k, text in enumerate(texts):
                extra = {"score": score(prompt.text, text)} if score else {}
                rows.append({**base, "response": text, "sample": k, **extra})
            continue
        pair = pick_pair(texts, [score(prompt.text, t) for t in texts], pair_choice,
                         longer_wins=longer_lead <= 0)
        if pair:
            rows.append({**base, "chosen": pair[0], "rejected": pair[1]})
            longer = words_longer(pair)
            longer_lead += (longer > 0) - (longer < 0)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True, help="policy checkpoint or save directory")
    parser.add_argument("--prompts", required=True, help="JSONL with prompt/question/messages")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokenizer", default=None,
                        help="default: the policy checkpoint's tokenizer")
    # not --n alone: under torchrun, whose parser takes every option, it is ambiguous
    parser.add_argument("--samples-per-prompt", "--n", dest="n", type=int, default=None,
                        help="samples per prompt (default 1; 2 with --pairs)")
    parser.add_argument("--pairs", action="store_true",
                        help="rank each prompt's samples (2 unless --samples-per-prompt) by "
                        "--scorer into one preference row")
    parser.add_argument("--pair-choice", choices=PAIR_CHOICES, default="first",
                        help="with --pairs: the first two samples, or pairs in which the "
                        "longer response wins as often as the shorter")
    parser.add_argument("--scorer", "--true-reward", dest="scorer", default=None,
                        help="synthetic:<seed>, bigram:<seed>, module:function or "
                             "file.py:function (see megatron_dvpo/rl/rewards.py)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--min-new-tokens", type=int, default=0,
                        help="EOS is not drawn before this many response tokens")
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
    n = args.n if args.n is not None else 2 if args.pairs else 1
    if n < 1 or args.batch_size < 1 or args.guide_top_k < 1:
        parser.error("--samples-per-prompt, --batch-size and --guide-top-k must be >= 1")
    if not 0 <= args.min_new_tokens < args.max_new_tokens:
        parser.error(f"--min-new-tokens {args.min_new_tokens} must be in [0, --max-new-tokens "
                     f"{args.max_new_tokens})")
    if args.pairs and n < 2:
        parser.error(f"--pairs needs --samples-per-prompt >= 2, got {n}")
    if args.pair_choice != "first" and not args.pairs:
        parser.error("--pair-choice needs --pairs")
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
                          SamplingConfig(args.max_new_tokens, args.temperature,
                                         min_new_tokens=args.min_new_tokens),
                          cfg.model.vocab_size, n, args.batch_size, args.seed * 131 + dp_rank,
                          guide_gvm, GuideConfig(args.guide_beta, args.guide_top_k))
    writes = (parallel_state.get_tensor_model_parallel_rank() == 0
              and parallel_state.is_pipeline_first_stage())
    gathered = distributed.gather_lists(samples, writes)
    if distributed.is_rank0():
        rows = output_rows(prompts, gathered, score, args.pair_choice if args.pairs else None)
        distributed.write_jsonl_rank0(args.out, rows, "rows")
        if args.pairs:
            print(length_balance(rows), flush=True)
    distributed.shutdown()


if __name__ == "__main__":
    main()
