"""DPO: the loss against hand-computed values, learning the synthetic task's preferences at
DP=2, the reference-free variant, and an exact resume."""

import math

import pytest
import torch

from conftest import launch
from megatron_dvpo.demo import scalars
from megatron_dvpo.rl.losses import dpo_loss


def test_dpo_loss_by_hand():
    chosen, rejected = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0])
    ref_c, ref_r = torch.tensor([-3.5, -5.0]), torch.tensor([-4.0, -3.0])
    loss, stats = dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.5)
    # margins 0.5 * ((0.5) - 0) = 0.25 and 0.5 * (0 - (-1)) = 0.5
    expected = -math.log(1 / (1 + math.exp(-0.25))) - math.log(1 / (1 + math.exp(-0.5)))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["correct"] == 2 and stats["margin_sum"].item() == pytest.approx(0.75)
    assert stats["chosen_reward_sum"].item() == pytest.approx(0.25)
    assert stats["rejected_reward_sum"].item() == pytest.approx(-0.5)
    # reference-free: margins 0.5 * (-3 + 4) = 0.5 and 0.5 * (-5 + 4) = -0.5
    free, stats = dpo_loss(chosen, rejected, torch.zeros(2), torch.zeros(2), beta=0.5)
    assert free.item() == pytest.approx(math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(0.5)),
                                        abs=1e-6)
    assert stats["correct"] == 1


def dpo(models, run_dir, nproc=1, *extra):
    launch(["-m", "megatron_dvpo.rl.dpo", "--config", "examples/sft_tiny.yaml",
            f"data.train_path={models.data}/train.jsonl", "data.eval_path=null",
            f"data.tokenizer={models.data}/tokenizer.model",
            f"checkpoint.init_from={models.policy}", f"logging.run_dir={run_dir}",
            f"checkpoint.save_dir={run_dir}/checkpoints", "data.global_batch_size=8",
            "data.micro_batch_size=4", "logging.log_interval=1", *extra], nproc=nproc)
    return scalars(run_dir / "tensorboard")


@pytest.mark.multirank
def test_dpo_learns_the_preferences_at_dp2(models, tmp_path):
    """60 steps of 8 pairs: the training loss falls and the implicit reward ranks most pairs."""
    logs = dpo(models, tmp_path, 2, "train_steps=60", "optimizer.lr=1e-3",
               "checkpoint.save_interval=0", "data.micro_batch_tokens=64")
    losses = [v for _, v in logs["dpo/loss"]]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1
    assert sum(losses[-10:]) / 10 < 0.8 * math.log(2), losses
    accuracy = [v for _, v in logs["dpo/reward_accuracy"]]
    assert sum(accuracy[-10:]) / 10 > 0.7, accuracy


def test_dpo_resumes_exactly(models, tmp_path):
    common = ("train_steps=6", "checkpoint.save_interval=3", "optimizer.lr=1e-3")
    unbroken = dpo(models, tmp_path / "unbroken", 1, *common)
    dpo(models, tmp_path / "broken", 1, *common, "exit_interval=3")
    assert (tmp_path / "broken/checkpoints/iter_0000003/model").is_dir()
    resumed = dpo(models, tmp_path / "broken", 1, *common)
    for tag in ("dpo/loss", "dpo/margin", "dpo/reward_accuracy"):
        expected, got = dict(unbroken[tag]), dict(resumed[tag])
        assert sorted(got) == list(range(1, 7)), tag
        for step in (4, 5, 6):
            assert got[step] == pytest.approx(expected[step], abs=1e-6), (tag, step)


def test_reference_free_dpo_loads_no_reference(models, tmp_path):
    logs = dpo(models, tmp_path, 1, "train_steps=2", "dpo.reference_free=true",
               "checkpoint.save_interval=0")
    assert all(math.isfinite(v) for _, v in logs["dpo/loss"])
    # without a reference the first margin is the policy's own log-prob gap, not 0
    assert logs["dpo/margin"][0][1] != 0
