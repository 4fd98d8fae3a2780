"""tools/bench_methods.py and tools/bench_guided.py in their quick modes, on the shared demo
stages and reward model (no timing or quality asserts: those are the benchmarks')."""

import pytest

from conftest import NPROC, quick_bench
from megatron_dvpo.demo import scalars


def reusing(task) -> list[str]:
    """A benchmark's options that reuse the shared demo stages instead of making its own."""
    return ["--task-dir", str(task.root.parent), "--nproc", str(NPROC), "--sft-steps", "100",
            "--gvm-steps", "300"]


def test_bench_guided_quick(task, tmp_path):
    """Plain, best-of-n and GVM-guided sampling on the same held-out prompts, end to end."""
    methods = quick_bench(tmp_path, "bench_guided.py", "--workdir", str(tmp_path),
                     *reusing(task))["methods"]
    assert set(methods) == {"plain", "best_of_2", "guided_beta_1"}
    for result in methods.values():
        assert result["prompts"] == 400 and -1 <= result["true_reward_mean"] <= 1
    # best-of-2 generates two samples per prompt
    assert methods["best_of_2"]["generated_tokens_per_prompt"] > \
        methods["plain"]["generated_tokens_per_prompt"]


def test_bench_methods_quick(reward_model, tmp_path):
    """All four methods in both settings, measured model state, and the quality runs (on the
    shared demo stages and reward model); without a reference DVPO holds one model fewer than
    with one, and PPO a critic more than DVPO."""
    # 16 rows: DPO's 8 pairs split over micro-batches of 4 at 2 ranks
    result = quick_bench(tmp_path, "bench_methods.py", "--workdir", str(tmp_path), "--batch", "16",
                         "--curves", str(tmp_path / "curves"), *reusing(reward_model))
    for setting in ("with_reference", "without_reference"):
        row = result["cost"][setting]
        assert set(row) == {"dvpo", "ppo", "grpo", "dpo", "dvpo_over_ppo"}
        assert "critic_gib" in row["ppo"] and "critic_gib" not in row["dvpo"]
        assert ("reference_gib" in row["dvpo"]) == (setting == "with_reference")
        assert row["dvpo_over_ppo"]["model_state_gib"] == (row["dvpo"]["model_state_gib"]
                                                           / row["ppo"]["model_state_gib"]) < 1
    quality = result["quality"]["synthetic"]
    for method in ("dvpo", "ppo", "grpo", "dpo"):
        assert -1 <= quality[method]["true_reward_after"] <= 1
    assert quality["dvpo"]["generated_tokens"] > 0 and quality["dpo"]["generated_tokens"] == 0
    # the over-optimisation curves: each RL method's true reward against its KL from the start
    assert (tmp_path / "curves" / "overopt_synthetic.png").stat().st_size > 10_000
    assert set(quality["overoptimization"]) == {"dvpo", "ppo", "grpo"}
    for method, found in quality["overoptimization"].items():
        assert found["final_kl"] >= 0 and -1 <= found["best_true_reward"] <= 1, method
    written = scalars(tmp_path / "curves" / "overopt_synthetic_tensorboard" / "dvpo")
    assert {"overoptimization/true_reward", "overoptimization/scorer_value",
            "overoptimization/eval_true_reward"} <= set(written)


def test_bench_defaults_quick(task, tmp_path):
    """One seed's GVM, reward model, oracle and DVPO runs (4, 2 and 2 steps) on the shared demo
    stages, and a variant with its own GVM (2 heads): the table's numbers are what the runs
    logged."""
    report = quick_bench(tmp_path, "bench_defaults.py", "--task-dir", str(task.root.parent),
                         "--nproc", str(NPROC), "--variant", "heads", "model.value_heads=2",
                         "gvm.value_head_init_std=0.02", "dvpo.head_pessimism=1")
    synthetic = report["tasks"]["synthetic"]
    assert 0.75 < synthetic["rule_best"] < 1.0  # 1.0 or 0.75 per prompt
    row = synthetic["seeds"]["5"]
    oracle = row["oracle"]  # GRPO scored by the rule, from the same policy and prompts
    assert oracle["before"] == row["default"]["before"] and len(oracle["curve"]) == 2
    for name in ("default", "heads"):
        found = row[name]
        gain = found["after"] - found["before"]
        assert found["closed"] == pytest.approx(gain / (synthetic["rule_best"] - found["before"]))
        if oracle["after"] > found["before"]:
            assert found["closed_vs_oracle"] == pytest.approx(
                gain / (oracle["after"] - found["before"]))
        else:
            assert found["closed_vs_oracle"] is None
        assert found["before"] == row["default"]["before"]  # the same policy, seed and prompts
    assert 0 <= row["heads"]["gvm_accuracy"] <= 1 and "gvm_accuracy" not in row["default"]
