"""Benchmark scripts run in their quick modes and write well-formed JSON (no timing asserts)."""

import json
import subprocess
import sys

from conftest import NPROC, REPO


def test_bench_convert_quick(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench_convert.py"),
                           "--shape", "tiny", "--out", str(out), "--workdir", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["parameters"] == 202048
    assert result["largest_tensor_group"] == {"name": "embedding", "bytes": 1024 * 64 * 2}
    for direction in ("import", "export"):
        r = result[direction]
        assert r["seconds"] > 0 and r["peak_rss"] >= r["baseline_rss"] > 0
        assert r["increase_over_largest_group"] == r["peak_increase"] / (1024 * 64 * 2)


def test_bench_gpu_quick_on_cpu(tmp_path):
    """The GPU benchmark's quick mode runs end to end on a CPU: every section measured, FP8
    reported as skipped with the precision check's reason, targets left undecided."""
    import torch

    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench_gpu.py"), "--quick",
                           "--out", str(out), "--workdir", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    if torch.cuda.is_available():
        return
    train = result["training"]["fp32"]
    assert train["tokens_per_step"] == 2 * 2 * 32
    assert train["tokens_per_s"] == train["tokens_per_step"] / train["step_time_s"]
    assert train["mfu"] is None  # no known peak on a CPU
    for name in ("fp8-tensorwise", "fp8-delayed", "fp8-blockwise"):
        assert "no CUDA GPU. FP8 never falls back" in result["training"][name]["skipped"]
    for method in ("dvpo_step", "ppo_step"):
        step = result[method]["fp32"]
        assert step["step_time_s"] > 0 and step["gen_time_s"] > 0 and step["peak_mem_gib"] > 0
        assert "skipped" in result[method]["fp8-tensorwise"]
    for sampler in ("ours", "hf_generate"):
        assert result["generation"][sampler]["new_tokens"] == 4 * 8  # no early stop
    assert result["targets"]["fp8_training_mfu"]["met"] is None
    assert result["targets"]["generation_over_hf_generate"]["value"] > 0


def test_gpu_smoke_dry_run_runs_every_phase(tmp_path):
    """The one-shot GPU smoke script, on tiny shapes in bf16 on this CPU, so that it cannot rot:
    every phase runs and every check of numbers passes."""
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, "tools/gpu_smoke.py", "--out", str(out), "--dry-run",
                           "--workdir", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["failed"] == []
    phases = report["phases"]
    assert all(phase["status"] == "ok" for phase in phases.values()), phases
    assert phases["env"]["fp8"].startswith("not run: ")  # no TE here, and it says why
    for phase, checks in (("nccl", {"device_all_reduce", "host_all_reduce"}),
                          ("training", {"losses_finite"}),
                          ("gvm_scoring", {"values_finite", "values_repeatable"}),
                          ("gvm_step", {"losses_finite", "no_skipped_update"}),
                          ("dvpo_step", {"losses_finite", "no_skipped_update"}),
                          ("ppo_step", {"losses_finite", "no_skipped_update"}),
                          ("checkpoint", {"weights_equal", "outputs_equal"})):
        assert set(phases[phase]["checks"]) == checks, phase
    assert phases["multi_gpu"]["ran"].startswith("not run: 0 GPU(s)")
    assert phases["sampler"]["ours_over_hf"] > 0 and phases["training"]["tokens_per_s"] > 0
    for step in ("dvpo_step", "ppo_step"):
        assert phases[step]["gen_time_s"] > 0 and phases[step]["peak_mem_gib"] > 0


def test_a_smoke_phase_past_its_limit_is_killed_with_its_children():
    """A phase's torchrun would keep the GPU if only the phase process were killed."""
    import psutil
    import pytest

    sys.path.insert(0, str(REPO / "tools"))
    from gpu_smoke import run_limited

    marker = "sleep 61.5"  # a grandchild's command line, to find it afterwards
    with pytest.raises(subprocess.TimeoutExpired):
        run_limited(["bash", "-c", f"{marker} & {marker}; wait"], 1.0)
    left = [p for p in psutil.process_iter(["cmdline"])
            if " ".join(p.info["cmdline"] or []) == marker]
    assert not left, left


def test_bench_gvm_quick(tmp_path):
    """Every objective trains on the compositional task and is compared with the reward model;
    the accuracies themselves are the benchmark's (README), not asserted here."""
    out = tmp_path / "gvm.json"
    proc = subprocess.run([sys.executable, "tools/bench_gvm.py", "--quick", "--tasks", "bigram",
                           "--seeds", "1,2", "--out", str(out), "--workdir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(out.read_text())["tasks"]["bigram"]["20"]
    assert set(row) == {"td", "td_pairwise", "v1_rm_scores", "bradley_terry"}
    for objective, result in row.items():
        assert set(result["seeds"]) == {"1", "2"}
        assert result["last"] == sum(r["last"] for r in result["seeds"].values()) / 2
        if objective != "bradley_terry":
            assert 0 <= result["last"] <= 1 and "gap_to_rm_points" in result


def test_bench_memory_quick(tmp_path):
    """Small shapes: the lean head's microbatch peaks below the full head's (at the real shape,
    V=128k and S=1024, the benchmark measures 0.28x; README), and GVM scoring without a dense
    mask below the dense mask's math-kernel path (0.27x at the default shape)."""
    out = tmp_path / "memory.json"
    proc = subprocess.run([sys.executable, "tools/bench_memory.py", "--quick", "--out",
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert 0 < report["lean"]["peak_increase"] < report["full"]["peak_increase"]
    assert report["lean_over_full"] < 0.8
    scoring = report["gvm_scoring"]
    assert 0 < scoring["causal"]["peak_increase"] < scoring["dense_mask_math"]["peak_increase"]
    assert scoring["causal_over_dense_mask_math"] < 0.8


def _quick(tmp_path, script: str, *args: str) -> dict:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / script), "--quick", "--out",
                           str(out), *args], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_bench_rollout_quick(tmp_path):
    row = _quick(tmp_path, "bench_rollout.py", "--workdir", str(tmp_path))["shapes"]["tiny"]["4"]
    for sampler in ("ours", "hf_generate"):
        assert row[sampler]["new_tokens"] == 4 * 8  # every row runs the full length
    assert row["ours_over_hf"] == row["ours"]["tokens_per_s"] / row["hf_generate"]["tokens_per_s"]


def test_bench_packing_quick(tmp_path):
    """The same gradients either way; the token budget computes fewer padded tokens."""
    result = _quick(tmp_path, "bench_packing.py")
    assert result["real_tokens"] < result["padded_tokens"]
    assert result["grad_max_abs"] > 1e-4
    assert 0 <= result["grad_max_abs_diff"] <= 1e-6


def reusing(task) -> list[str]:
    """A benchmark's options that reuse the shared demo stages instead of making its own."""
    return ["--task-dir", str(task.root.parent), "--nproc", str(NPROC), "--sft-steps", "100",
            "--gvm-steps", "300"]


def test_bench_guided_quick(task, tmp_path):
    """Plain, best-of-n and GVM-guided sampling on the same held-out prompts, end to end."""
    methods = _quick(tmp_path, "bench_guided.py", "--workdir", str(tmp_path),
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
    result = _quick(tmp_path, "bench_methods.py", "--workdir", str(tmp_path), "--batch", "16",
                    *reusing(reward_model))
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
