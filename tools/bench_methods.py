#!/usr/bin/env python
"""DVPO against PPO, GRPO and DPO in the same code, matched: cost and quality in one run.

    python tools/bench_methods.py --out bench_methods.json [--quick] [--nproc 1]
        [--tasks synthetic,bigram] [--skip-cost] [--skip-quality] [--task-dir DIR]

**Cost.** One random policy of ``--layers`` x ``--hidden`` (~54M parameters by default) is
converted into every model the methods need (policy, reference, GVM, reward model, critic:
identical sizes). Each method runs ``--cost-steps`` steps through its command line with the
same rollout rows per step (GRPO: a quarter of the prompts, 4 samples each), lengths, layout and
optimizer, twice: with a reference model (``rl.kl_coef=0.05``; DPO with its reference) and
without (``rl.kl_coef=0``; reference-free DPO). Per method: peak memory (RSS of rank 0 on CPU,
``max_memory_allocated`` on GPU), the measured bytes of every model's weights, gradients and
optimizer state (``memory/*``), mean step time (the first step left out) split into generation,
scoring and training, and tokens/s; then DVPO/PPO ratios for each setting.

**Quality.** For each built-in task (``synthetic``: words, ``bigram``: word pairs), the demo's
stages make an SFT policy and preference pairs sampled from it; a GVM (``gvm_tiny``'s objective)
and a Bradley-Terry reward model are trained once on those pairs, for the same steps. DVPO (the
GVM), PPO and GRPO (n=4; the reward model) then run ``--rl-steps`` steps of the same rollout
rows (so about the same generated tokens), and DPO as many updates of as many rows on the
pairs; each reports the held-out true reward (the task's hidden rule) before and after.
``--curves DIR`` draws DVPO's, PPO's and GRPO's true reward, scorer value and (K-head GVM)
disagreement against KL from the start (``tools/plot_overoptimization.py``), per task.
``--task-dir DIR`` keeps each task's stages (and its reward model) in ``DIR/<task>`` and reuses
those already run there with the same commands (the test suite's shared artifacts, or a
previous run's).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from bench_dvpo_vs_ppo import build_models, run_method  # noqa: E402
from plot_overoptimization import plot_overoptimization  # noqa: E402
from megatron_dvpo.demo import (REWARD_MODEL_STAGE, _run, policy_and_gvm, scalars,  # noqa: E402
                                train_value_model)

GROUP = 4  # GRPO's samples per prompt
# The policy of each task for the quality runs: a word-pair rule needs more than the demo's
# 2 x 64 model (tools/bench_gvm.py).
TASK_SHAPES = {"synthetic": (), "bigram": ("--layers", "4", "--hidden", "128", "--heads", "4",
                                           "--kv-heads", "2")}


def rl_methods(value: Path, reward_model: Path, batch: int) -> dict[str, tuple[str, list]]:
    """The RL methods' modules and their own keys; every other key is shared. DVPO runs the
    example's gae (lambda 0 over per-sequence whitened GVM values); PPO's GAE over its critic
    keeps the usual lambda 0.95 (its true reward barely moves with lambda: docs/algorithm.md,
    "Which estimator")."""
    return {"dvpo": ("megatron_dvpo.rl.dvpo", [f"dvpo.gvm={value}"]),
            "ppo": ("megatron_dvpo.rl.ppo", [f"ppo.reward_model={reward_model}", "rl.lam=0.95"]),
            "grpo": ("megatron_dvpo.rl.grpo", [f"grpo.reward_model={reward_model}",
                                               f"rollout.n_samples={GROUP}",
                                               f"data.global_batch_size={batch // GROUP}"])}


def dpo_run(run_dir: Path, policy: Path, pairs: Path, tokenizer: Path, steps: int, rows: int,
            micro_batch: int, nproc: int, extra: list[str]) -> dict:
    """DPO through its command line: ``rows`` rows (rows/2 pairs) per step."""
    _run(f"{run_dir.name}: {steps} steps", [
        "-m", "megatron_dvpo.rl.dpo", "--config", "examples/sft_tiny.yaml",
        f"data.train_path={pairs}", "data.eval_path=null", f"data.tokenizer={tokenizer}",
        f"checkpoint.init_from={policy}", f"logging.run_dir={run_dir}",
        f"checkpoint.save_dir={run_dir}/checkpoints", f"train_steps={steps}",
        "checkpoint.save_interval=0", f"data.global_batch_size={rows // 2}",
        f"data.micro_batch_size={micro_batch}", "logging.log_interval=1", *extra], nproc)
    return scalars(run_dir / "tensorboard")


def _mean_after_first(points: list[tuple[int, float]]) -> float:
    values = [v for step, v in points if step > 1] or [v for _, v in points]
    return statistics.fmean(values)


def cost(work: Path, args) -> dict:
    models = build_models(work, ["--layers", str(args.layers), "--hidden", str(args.hidden),
                                 "--heads", str(args.heads), "--kv-heads", str(args.heads),
                                 "--ffn", str(args.ffn), "--vocab", str(args.vocab)])
    step_args = argparse.Namespace(steps=args.cost_steps, batch=args.batch,
                                   micro_batch=args.micro_batch,
                                   max_new_tokens=args.max_new_tokens, nproc=args.nproc,
                                   overrides=[])
    methods = rl_methods(models["value"], models["value"], args.batch)
    result = {"config": {"policy_parameters": json.loads(
        (models["policy"] / "conversion.json").read_text())["parameters"]}}
    for setting, kl in (("with_reference", "0.05"), ("without_reference", "0")):
        row = {}
        for name, (module, extra) in methods.items():
            row[name] = run_method(f"{name}-{setting}", module, work, models, step_args,
                                   extra + [f"rl.kl_coef={kl}"])
        logs = dpo_run(work / f"dpo-{setting}", models["policy"], models["prompts"],
                       models["hf"], args.cost_steps, args.batch, args.micro_batch, args.nproc,
                       # rows as wide as the RL methods' rollouts (prompt + response)
                       [f"data.seq_length={32 + args.max_new_tokens}"]
                       + ([] if kl != "0" else ["dpo.reference_free=true"]))
        row["dpo"] = {"step_time_s": _mean_after_first(logs["perf/step_time_s"]),
                      "train_tokens_per_s": _mean_after_first(logs["perf/train_tokens_per_s"]),
                      "peak_mem_gib": max(v for _, v in logs["perf/peak_mem_gib"]),
                      **{tag.split("/", 1)[1]: logs[tag][-1][1] for tag in logs
                         if tag.startswith("memory/")}}
        dvpo, ppo = row["dvpo"], row["ppo"]
        row["dvpo_over_ppo"] = {key: dvpo[key] / ppo[key] for key in (
            "peak_mem_gib", "model_state_gib", "step_time_s", "score_time_s", "train_time_s")}
        result[setting] = row
    return result


def quality(work: Path, rule: str, args) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    reuse = args.task_dir is not None
    task = Path(args.task_dir) / rule if reuse else work
    data, policy, gvm = policy_and_gvm(task, args.nproc, args.sft_steps, args.gvm_steps, rule,
                                       TASK_SHAPES[rule], reuse=reuse)
    pairs, tokenizer = task / "pairs_train.jsonl", data / "tokenizer.model"
    reward_model = train_value_model(task, "reward_model", REWARD_MODEL_STAGE, args.gvm_steps,
                                     "gvm.objective=bradley_terry", reuse=reuse)
    accuracy = {name: scalars(task / name / "tensorboard")["gvm/pair_acc_last"][-1][1]
                for name in ("gvm", "reward_model")}
    held_out = work / "eval.jsonl"  # the first --eval-rows held-out prompts (all by default)
    lines = (data / "eval.jsonl").read_text().splitlines(keepends=True)
    held_out.write_text("".join(lines[:args.eval_rows or None]))
    result = {"held_out_pair_accuracy": accuracy}
    for name, (module, extra) in rl_methods(gvm, reward_model, args.rl_batch).items():
        run_dir = work / name
        _run(f"{rule}: {name}", [
            "-m", module, "--config", "examples/dvpo_tiny.yaml",
            f"data.train_path={data}/train.jsonl", f"data.eval_path={held_out}",
            f"rl.policy={policy}", f"rl.true_reward={rule}:0", f"logging.run_dir={run_dir}",
            "checkpoint.save_dir=null", f"train_steps={args.rl_steps}", "rl.eval_interval=0",
            f"data.global_batch_size={args.rl_batch}", "logging.log_interval=1", *extra],
             args.nproc)
        logs = scalars(run_dir / "tensorboard")
        rows = args.rl_batch
        result[name] = {"true_reward_before": logs["eval/true_reward_mean"][0][1],
                        "true_reward_after": logs["eval/true_reward_mean"][-1][1],
                        "generated_tokens": sum(v * rows for _, v in
                                                logs["rollout/response_len_mean"])}
    if args.curves:  # the methods side by side against their KL from the start
        curves = Path(args.curves)
        result["overoptimization"] = plot_overoptimization(
            [work / name for name in ("dvpo", "ppo", "grpo")], curves / f"overopt_{rule}.png",
            curves / f"overopt_{rule}_tensorboard")
    dpo_dir = work / "dpo"
    dpo_run(dpo_dir, policy, pairs, tokenizer, args.rl_steps, args.rl_batch, 16, args.nproc,
            ["optimizer.lr=1e-3"])
    scored = work / "dpo_eval.jsonl"
    _run(f"{rule}: DPO policy on the held-out prompts", [
        "-m", "megatron_dvpo.sample", "--policy",
        str(dpo_dir / "checkpoints" / f"iter_{args.rl_steps:07d}"), "--prompts",
        str(held_out), "--out", str(scored), "--scorer", f"{rule}:0",
        "--max-new-tokens", "12", "--seed", "3"], args.nproc)
    rows = [json.loads(line) for line in scored.read_text().splitlines() if line.strip()]
    result["dpo"] = {"true_reward_before": result["dvpo"]["true_reward_before"],
                     "true_reward_after": statistics.fmean(r["score"] for r in rows),
                     "generated_tokens": 0}
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and budgets (tests)")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--tasks", default="synthetic,bigram")
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--cost-steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16, help="rollout rows per step (cost)")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--sft-steps", type=int, default=100)
    parser.add_argument("--gvm-steps", type=int, default=300)
    parser.add_argument("--rl-steps", type=int, default=30)
    parser.add_argument("--rl-batch", type=int, default=64, help="rollout rows per step")
    parser.add_argument("--eval-rows", type=int, default=0,
                        help="held-out prompts the true reward is measured on (0: all)")
    parser.add_argument("--task-dir", default=None,
                        help="each task's stages 1-5 and reward model kept and reused here")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--curves", default=None,
                        help="draw each task's over-optimisation curves (DVPO, PPO, GRPO) here")
    args = parser.parse_args(argv)
    if args.quick:  # tiny sizes and budgets; options given explicitly still win
        parser.set_defaults(layers=2, hidden=64, heads=4, ffn=128, vocab=256, cost_steps=2,
                            batch=8, micro_batch=4, max_new_tokens=8, sft_steps=4, gvm_steps=4,
                            rl_steps=2, eval_rows=64, tasks="synthetic")
        args = parser.parse_args(argv)
    report = {"config": {k: v for k, v in vars(args).items()
                         if k not in ("out", "workdir", "task_dir")}}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        if not args.skip_cost:
            report["cost"] = cost(Path(tmp) / "cost", args)
            Path(args.out).write_text(json.dumps(report, indent=2))
        if not args.skip_quality:
            report["quality"] = {rule: quality(Path(tmp) / rule, rule, args)
                                 for rule in args.tasks.split(",")}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
