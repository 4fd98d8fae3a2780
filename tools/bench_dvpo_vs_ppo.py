#!/usr/bin/env python
"""DVPO against the PPO baseline: peak memory and time per step, same code, same sizes.

    python tools/bench_dvpo_vs_ppo.py --out bench_dvpo_vs_ppo.json [--quick] [--nproc 2]
        [--layers 8 --hidden 512 --steps 6 --batch 32 --max-new-tokens 32] [k=v ...]

Builds one random policy and converts it into every model both methods need (policy, GVM,
reward model, critic: identical sizes), then runs DVPO and PPO for the same number of steps with
the same batch, lengths and parallel layout, each in its own process group. Per method it
reports peak memory (CPU RSS of rank 0; on GPU ``max_memory_allocated``), mean step time split
into generation, scoring and training (the first step, a warm-up, is left out), tokens/s, and an
analytic breakdown of model-state memory; then the two ratios DVPO/PPO.

Both run with the same ``rl.kl_coef`` (0.05: a reference on both sides); what DVPO saves by
construction is then the critic, its gradients and optimizer state, and one frozen scoring pass
instead of reward model plus critic. ``tools/bench_methods.py`` adds GRPO and DPO, the setting
without a reference, measured model-state bytes and the learning itself.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megatron_dvpo.demo import _run, scalars  # noqa: E402

PHASES = ("perf/gen_time_s", "perf/score_time_s", "perf/train_time_s", "perf/step_time_s")


def build_models(work: Path, shape: list[str]) -> dict[str, Path]:
    """Prompts, a random policy of ``shape`` (tools/build_tiny_hf.py arguments) and its value
    model twin, both imported."""
    data = work / "synthetic"
    _run("synthetic task", ["-m", "megatron_dvpo.data.synthetic", str(data),
                            "--train-rows", "512", "--eval-rows", "16"])
    _run("random policy", ["tools/build_tiny_hf.py", "--tokenizer", str(data / "tokenizer.model"),
                           "--out", str(work / "hf"), "--max-positions", "256", *shape])
    models = {"policy": work / "policy", "value": work / "value"}
    _run("import policy", ["tools/convert_hf_to_megatron.py", "--hf", str(work / "hf"), "--out",
                           str(models["policy"]), "--overwrite"])
    _run("import value model", ["tools/convert_hf_to_megatron.py", "--hf", str(work / "hf"),
                                "--out", str(models["value"]), "--target", "gvm", "--overwrite"])
    models["prompts"] = data / "train.jsonl"
    models["hf"] = work / "hf"
    return models


def state_breakdown(params: int, bytes_per_param: int, trained: bool) -> dict[str, int]:
    """Model-state bytes: weights, plus fp32 gradients and Adam state when trained."""
    breakdown = {"weights": params * bytes_per_param}
    if trained:
        breakdown["grads_fp32"] = params * 4
        breakdown["adam_fp32"] = params * 8 + (params * 4 if bytes_per_param < 4 else 0)
    return breakdown


def run_method(name: str, module: str, work: Path, models: dict, args, extra: list[str]) -> dict:
    run_dir = work / name
    _run(f"{name}: {args.steps} steps", [
        "-m", module, "--config", "examples/dvpo_tiny.yaml",
        f"data.train_path={models['prompts']}", "data.eval_path=null",
        f"rl.policy={models['policy']}", f"logging.run_dir={run_dir}",
        "checkpoint.save_dir=null", f"train_steps={args.steps}", "logging.log_interval=1",
        f"data.global_batch_size={args.batch}", f"data.micro_batch_size={args.micro_batch}",
        f"rollout.max_new_tokens={args.max_new_tokens}", "rollout.max_prompt_length=32",
        "data.seq_length=256", "rl.true_reward=null", "rl.eval_interval=0",
        "rl.ppo_epochs=1", "rl.minibatches=1", *extra, *args.overrides], args.nproc)
    logs = scalars(run_dir / "tensorboard")
    measured = {}
    for tag in PHASES + ("perf/gen_tokens_per_s", "perf/train_tokens_per_s"):
        values = [v for step, v in logs[tag] if step > 1] or [v for _, v in logs[tag]]
        measured[tag.split("/")[1]] = sum(values) / len(values)
    measured["peak_mem_gib"] = max(v for _, v in logs["perf/peak_mem_gib"])
    measured["skipped_updates"] = logs.get("train/skipped_updates", [(0, 0.0)])[-1][1]
    measured["losses_finite"] = all(math.isfinite(v) for _, v in logs["policy/loss"])
    # measured model state: memory/<model>_gib and memory/model_state_gib (their total)
    measured.update({tag.split("/", 1)[1]: logs[tag][-1][1] for tag in logs
                     if tag.startswith("memory/")})
    return measured


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="a tiny model, 3 steps (tests)")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("overrides", nargs="*", help="key=value for both runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.heads, args.steps = 2, 64, 4, 3
        args.batch, args.micro_batch, args.max_new_tokens = 8, 4, 8

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        models = build_models(work, ["--layers", str(args.layers), "--hidden", str(args.hidden),
                                     "--heads", str(args.heads), "--kv-heads", str(args.heads)])
        from megatron_dvpo.config import load_config

        policy_cfg = load_config(models["policy"] / "config.yaml")
        params = json.loads((models["policy"] / "conversion.json").read_text())["parameters"]
        value_params = json.loads((models["value"] / "conversion.json").read_text())["parameters"]
        width = 4 if policy_cfg.precision.params_dtype == "fp32" else 2
        dvpo = run_method("dvpo", "megatron_dvpo.rl.dvpo", work, models, args,
                          [f"dvpo.gvm={models['value']}", "rl.kl_coef=0.05"])
        ppo = run_method("ppo", "megatron_dvpo.rl.ppo", work, models, args,
                         [f"ppo.reward_model={models['value']}", "rl.kl_coef=0.05"])
    dvpo["model_state_bytes"] = {"policy": state_breakdown(params, width, True),
                                 "reference": state_breakdown(params, width, False),
                                 "gvm": state_breakdown(value_params, width, False)}
    ppo["model_state_bytes"] = {"policy": state_breakdown(params, width, True),
                                "reference": state_breakdown(params, width, False),
                                "reward_model": state_breakdown(value_params, width, False),
                                "critic": state_breakdown(value_params, width, True)}
    for method in (dvpo, ppo):
        method["model_state_total_bytes"] = sum(sum(m.values())
                                                for m in method["model_state_bytes"].values())
    result = {
        "config": {"layers": args.layers, "hidden": args.hidden, "policy_parameters": params,
                   "steps": args.steps, "prompts_per_step": args.batch,
                   "max_new_tokens": args.max_new_tokens, "nproc": args.nproc,
                   "device": "cuda" if _cuda() else "cpu"},
        "dvpo": dvpo, "ppo": ppo,
        "ratios": {"peak_memory": dvpo["peak_mem_gib"] / ppo["peak_mem_gib"],
                   "model_state_memory": (dvpo["model_state_total_bytes"]
                                          / ppo["model_state_total_bytes"]),
                   "step_time": dvpo["step_time_s"] / ppo["step_time_s"],
                   "score_time": dvpo["score_time_s"] / ppo["score_time_s"],
                   "train_time": dvpo["train_time_s"] / ppo["train_time_s"]},
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result["ratios"], indent=2))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
