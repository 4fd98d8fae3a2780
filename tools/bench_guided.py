#!/usr/bin/env python
"""GVM-guided decoding against best-of-n sampling scored by the same GVM, on held-out prompts.

    python tools/bench_guided.py --out bench_guided.json [--quick] [--n 4] [--betas 1,4]
        [--task-dir DIR]

The demo's stages 1-5 make a policy (SFT on the synthetic task) and a GVM trained on pairs
sampled from it. Then, on the task's held-out prompts, each decoding method samples through
``megatron_dvpo.sample`` and the task's hidden rule scores the responses (``synthetic:0``):

- ``plain``: one sample per prompt;
- ``best_of_<n>``: n samples, the GVM (``megatron_dvpo.gvm.score``) keeps the best-valued one;
- ``guided_beta_<b>``: one sample, the GVM steering each step (``--guide-gvm``).

For each: the true reward of the kept responses, the tokens generated per prompt, and the
true reward's gain over ``plain`` per generated token (best-of-n pays n samples).

``--task-dir DIR`` keeps the stages 1-5 in ``DIR/synthetic`` and reuses those already run there
with the same commands (the test suite's shared artifacts, or a previous run's).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megatron_dvpo.demo import _run, policy_and_gvm  # noqa: E402


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sample(work: Path, name: str, data: Path, policy: Path, args, *extra: str) -> list[dict]:
    out = work / f"{name}.jsonl"
    _run(name, ["-m", "megatron_dvpo.sample", "--policy", str(policy), "--prompts",
                str(data / "eval.jsonl"), "--out", str(out), "--scorer", "synthetic:0",
                "--max-new-tokens", str(args.max_new_tokens), "--seed", "3", *extra],
         args.nproc)
    return read_jsonl(out)


def summary(kept: list[dict], generated_tokens: int) -> dict:
    return {"true_reward_mean": sum(r["score"] for r in kept) / len(kept),
            "generated_tokens_per_prompt": generated_tokens / len(kept),
            "prompts": len(kept)}


def tokens_of(rows: list[dict], tokenizer) -> int:
    return sum(len(tokenizer.encode(r["response"])) + 1 for r in rows)  # + EOS


def best_of_n(work: Path, rows: list[dict], gvm: Path, n: int, args) -> list[dict]:
    """Per prompt, the sample the GVM values most. Empty responses, which value data refuses,
    are never kept over a scored one."""
    scored_rows = [r for r in rows if r["response"].strip()]
    samples = work / f"best_of_{n}_nonempty.jsonl"
    # value data rows carry a score: the true one, which the GVM's replaces in the output
    samples.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["response"],
                                           "score": r["score"]}) + "\n" for r in scored_rows))
    scored_path = work / f"gvm_scored_{n}.jsonl"
    _run("GVM scores of the samples", ["-m", "megatron_dvpo.gvm.score", "--ckpt", str(gvm),
                                       "--data", str(samples), "--out", str(scored_path)],
         args.nproc)
    value_of = {(v["prompt"], v["response"]): v["score"] for v in read_jsonl(scored_path)}
    # the GVM's data reader drops what it cannot read back (a response that re-tokenizes past
    # data.seq_length, say): such samples are never kept over a scored one, and are counted
    unscored = sum((r["prompt"], r["response"]) not in value_of for r in rows)
    print(f"   {unscored} of {len(rows)} samples have no GVM score", flush=True)
    groups = defaultdict(list)
    for row in rows:
        groups[row["prompt"]].append(row)
    return [max(group, key=lambda r: value_of.get((r["prompt"], r["response"]), float("-inf")))
            for group in groups.values()]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, default=4, help="best-of-n samples per prompt")
    parser.add_argument("--betas", default="1,4", help="guidance strengths, comma-separated")
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--sft-steps", type=int, default=100)
    parser.add_argument("--gvm-steps", type=int, default=300)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--quick", action="store_true",
                        help="tiny budgets (tests); options given explicitly still win")
    parser.add_argument("--task-dir", default=None, help="stages 1-5 kept and reused here")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(sft_steps=4, gvm_steps=4, n=2, betas="1")
        args = parser.parse_args(argv)
    from megatron_dvpo.data.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        task = Path(args.task_dir) / "synthetic" if args.task_dir else work
        data, policy, gvm = policy_and_gvm(task, args.nproc, args.sft_steps, args.gvm_steps,
                                           reuse=args.task_dir is not None)
        tokenizer = load_tokenizer(str(data / "tokenizer.model"))
        methods = {}
        plain = sample(work, "plain", data, policy, args)
        methods["plain"] = summary(plain, tokens_of(plain, tokenizer))
        rows = sample(work, f"best_of_{args.n}", data, policy, args, "--samples-per-prompt",
                      str(args.n))
        methods[f"best_of_{args.n}"] = summary(best_of_n(work, rows, gvm, args.n, args),
                                               tokens_of(rows, tokenizer))
        for beta in args.betas.split(","):
            guided = sample(work, f"guided_beta_{beta}", data, policy, args, "--guide-gvm",
                            str(gvm), "--guide-beta", beta, "--guide-top-k", str(args.top_k))
            methods[f"guided_beta_{beta}"] = summary(guided, tokens_of(guided, tokenizer))
    base = methods["plain"]["true_reward_mean"]
    for result in methods.values():
        result["gain_over_plain_per_token"] = ((result["true_reward_mean"] - base)
                                               / result["generated_tokens_per_prompt"])
    report = {"config": {k: v for k, v in vars(args).items() if k not in ("out", "workdir")},
              "methods": methods}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(methods, indent=2))


if __name__ == "__main__":
    main()
