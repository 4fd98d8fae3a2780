"""The PPO baseline: reward-model training, PPO steps at TP=2 and PP=2, and the benchmark."""

import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import REPO, launch, resumed_from
from megatron_dvpo.demo import scalars


def test_reward_model_reaches_high_pairwise_accuracy(reward_model):
    """Bradley-Terry through the GVM trainer, 300 steps on the SFT policy's pairs (the shared
    reward model): >= 90% held-out pairwise accuracy, and the loss at least halves."""
    logs = scalars(reward_model.reward_model.parent.parent / "tensorboard")
    assert logs["gvm/pair_acc_last"][-1][1] >= 0.90, logs["gvm/pair_acc_last"]
    losses = [v for _, v in logs["rm/loss"]]
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.multirank
@pytest.mark.parametrize("layout", ["parallel.tensor_model_parallel_size=2",
                                    "parallel.pipeline_model_parallel_size=2"])
def test_ppo_steps_at_tp2_and_pp2(models, tmp_path, layout):
    launch(["-m", "megatron_dvpo.rl.ppo", "--config", "examples/dvpo_tiny.yaml",
            f"data.train_path={models.data}/train.jsonl", "data.eval_path=null",
            f"rl.policy={models.policy}", f"ppo.reward_model={models.gvm_init}",
            f"logging.run_dir={tmp_path}", "checkpoint.save_dir=null", "train_steps=2",
            "data.global_batch_size=16", "data.micro_batch_size=4", "rl.kl_coef=0.05",
            "logging.log_interval=1", "rl.eval_interval=0", layout], nproc=2)
    logs = scalars(tmp_path / "tensorboard")
    for tag in ("policy/loss", "critic/loss", "rollout/kl_ref", "perf/score_time_s",
                "critic/vf_explained_var",
                "rollout/reward_model_score_mean"):  # named after the model that scores
        assert len(logs[tag]) == 2 and all(math.isfinite(v) for _, v in logs[tag]), tag
    assert "rollout/gvm_final_value_mean" not in logs


def test_ppo_resumes_exactly_with_its_critic(reward_model, tmp_path):
    """Resumed from an unbroken run's step-3 checkpoint, steps 4-6 equal that run's (policy and
    critic), because the critic's weights, optimizer and schedule are checkpointed with the
    policy."""
    def run(name, *extra):
        run_dir = tmp_path / name
        launch(["-m", "megatron_dvpo.rl.ppo", "--config", "examples/dvpo_tiny.yaml",
                f"data.train_path={reward_model.data}/train.jsonl", "data.eval_path=null",
                f"rl.policy={reward_model.policy}",
                f"ppo.reward_model={reward_model.reward_model}",
                f"logging.run_dir={run_dir}", f"checkpoint.save_dir={run_dir}/checkpoints",
                "train_steps=6", "checkpoint.save_interval=3", "data.global_batch_size=16",
                "data.micro_batch_size=4", "rl.kl_coef=0.05", "logging.log_interval=1",
                "rl.eval_interval=0", *extra], nproc=1)
        return run_dir, scalars(run_dir / "tensorboard")

    unbroken_dir, unbroken = run("unbroken")
    assert (unbroken_dir / "checkpoints/iter_0000003/critic/metadata.json").is_file()
    resumed_from(unbroken_dir, tmp_path / "resumed", 3)
    _, resumed = run("resumed")
    for tag in ("policy/loss", "critic/loss", "rollout/beta", "policy/approx_kl"):
        expected, got = dict(unbroken[tag]), dict(resumed[tag])
        assert sorted(got) == [4, 5, 6], tag
        for step in (4, 5, 6):
            assert got[step] == pytest.approx(expected[step], abs=1e-6), (tag, step)
    assert any(abs(v) > 1e-4 for _, v in unbroken["critic/loss"])  # the critic does learn


def test_bench_dvpo_vs_ppo_quick(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "tools/bench_dvpo_vs_ppo.py", "--quick", "--out",
                           str(out), "--workdir", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for method in ("dvpo", "ppo"):
        for key in ("gen_time_s", "score_time_s", "train_time_s", "step_time_s",
                    "peak_mem_gib", "gen_tokens_per_s", "train_tokens_per_s"):
            assert result[method][key] > 0, (method, key)
    assert set(result["ppo"]["model_state_bytes"]) == {"policy", "reference", "reward_model",
                                                       "critic"}
    assert set(result["dvpo"]["model_state_bytes"]) == {"policy", "reference", "gvm"}
    assert result["ratios"]["model_state_memory"] < 1
    assert set(result["ratios"]) == {"peak_memory", "model_state_memory", "step_time",
                                     "score_time", "train_time"}


def test_explained_variance_of_the_critic(single_rank):
    from megatron_dvpo.rl.updates import explained_variance

    returns = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.5), returns, mask) == pytest.approx(0.0)
    # padding never counts: a wild value there changes nothing
    noisy = returns + torch.tensor([[0.5, -0.5, 0.0], [0.0, 99.0, 99.0]])
    assert explained_variance(noisy, returns, mask) == pytest.approx(1 - 0.125 / 1.25)
