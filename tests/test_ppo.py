"""The PPO baseline: reward-model training, PPO steps at TP=2 and PP=2, and the benchmark."""

import json
import math
import subprocess
import sys

import pytest

from conftest import REPO, tiny_policy_and_gvm, torchrun
from megatron_dvpo.demo import scalars


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_policy_and_gvm(tmp_path_factory.mktemp("ppo"))


def test_reward_model_reaches_high_pairwise_accuracy(models, tmp_path):
    """Bradley-Terry through the GVM trainer: 200 steps of 32 pairs, seed 1234 -> >= 90%."""
    data = models / "synthetic"
    torchrun(["-m", "megatron_dvpo.gvm.train", "--config", "examples/gvm_tiny.yaml",
              f"data.train_path={data}/train.jsonl", f"data.eval_path={data}/eval.jsonl",
              f"data.tokenizer={data}/tokenizer.model", f"logging.run_dir={tmp_path}",
              "checkpoint.save_dir=null", "gvm.objective=bradley_terry", "train_steps=200",
              "data.global_batch_size=32", "gvm.eval_interval=0", "logging.log_interval=20"],
             nproc=1)
    logs = scalars(tmp_path / "tensorboard")
    assert logs["gvm/pair_acc_last"][-1][1] >= 0.90, logs["gvm/pair_acc_last"]
    losses = [v for _, v in logs["rm/loss"]]
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.multirank
@pytest.mark.parametrize("layout", ["parallel.tensor_model_parallel_size=2",
                                    "parallel.pipeline_model_parallel_size=2"])
def test_ppo_steps_at_tp2_and_pp2(models, tmp_path, layout):
    torchrun(["-m", "megatron_dvpo.dvpo.ppo", "--config", "examples/dvpo_tiny.yaml",
              f"data.train_path={models}/synthetic/train.jsonl", "data.eval_path=null",
              f"dvpo.policy={models}/policy", f"ppo.reward_model={models}/gvm",
              f"logging.run_dir={tmp_path}", "checkpoint.save_dir=null", "train_steps=2",
              "data.global_batch_size=16", "data.micro_batch_size=4", "dvpo.kl_coef=0.05",
              "logging.log_interval=1", "dvpo.eval_interval=0", layout], nproc=2)
    logs = scalars(tmp_path / "tensorboard")
    for tag in ("policy/loss", "critic/loss", "rollout/kl_ref", "perf/score_time_s"):
        assert len(logs[tag]) == 2 and all(math.isfinite(v) for _, v in logs[tag]), tag


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
    assert set(result["dvpo"]["model_state_bytes"]) == {"policy", "gvm"}
    assert result["ratios"]["model_state_memory"] < 1
    assert set(result["ratios"]) == {"peak_memory", "model_state_memory", "step_time",
                                     "score_time", "train_time"}
