"""The GPU tools run on this CPU so that they cannot rot: the benchmark's quick mode and the
one-shot smoke script's dry run (every phase, every check of numbers)."""

import json
import subprocess
import sys

from conftest import REPO


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
