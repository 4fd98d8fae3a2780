"""A GVM of K value heads on one trunk (docs/algorithm.md §1, "Value heads"): the objective is
the heads' mean, the heads train apart and agree on their data, DVPO reads mean - k x std and
logs how much the heads disagree."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

from conftest import REPO
from megatron_dvpo.config import ConfigError, GVMConfig, load_config, validate_model
from megatron_dvpo.demo import scalars
from megatron_dvpo.gvm.heads import heads_as_rows, read_heads
from megatron_dvpo.gvm.objectives import OBJECTIVES

HEADS = 3


def _batch(rows: int = 4, seq: int = 10):
    generator = torch.Generator().manual_seed(0)
    return {"prompt_lengths": torch.tensor([3, 2, 4, 3])[:rows],
            "response_lengths": torch.tensor([5, 6, 3, 4])[:rows],
            "rewards": torch.tensor([1.0, -1.0, 1.0, -1.0])[:rows],
            "tokens": torch.randint(0, 50, (rows, seq), generator=generator)}


@pytest.mark.parametrize("objective", ["td", "td_pairwise", "bradley_terry"])
def test_the_k_head_objective_is_the_mean_of_each_heads_own(objective):
    """Each head is trained on its own TD targets: the K-head loss, its gradient and its
    statistics are the means over heads of the one-head ones."""
    loss = OBJECTIVES[objective](GVMConfig(objective=objective)).loss
    values = torch.randn(4, 10, HEADS, dtype=torch.float64, requires_grad=True)
    batch = _batch()
    terms, stats = loss.terms({"values": values}, batch)
    total = sum(terms.values())
    (grad,) = torch.autograd.grad(total, values)
    for k in range(HEADS):
        one = values[..., k].detach().requires_grad_(True)
        head_terms, head_stats = loss.terms({"values": one}, batch)
        (head_grad,) = torch.autograd.grad(sum(head_terms.values()), one)
        torch.testing.assert_close(grad[..., k], head_grad / HEADS)
        for name in stats:
            head_stats[name] = head_stats[name] / HEADS
        if k == 0:
            expected_terms = {n: v.detach() / HEADS for n, v in head_terms.items()}
            expected_stats = dict(head_stats)
        else:
            expected_terms = {n: expected_terms[n] + v.detach() / HEADS
                              for n, v in head_terms.items()}
            expected_stats = {n: expected_stats[n] + head_stats[n] for n in stats}
    for name in terms:
        torch.testing.assert_close(terms[name].detach(), expected_terms[name])
    for name in stats:
        torch.testing.assert_close(stats[name], expected_stats[name])


def test_heads_become_rows_and_are_read_as_mean_minus_k_std():
    values = torch.arange(2 * 3 * HEADS, dtype=torch.float32).view(2, 3, HEADS)
    rows, batch = heads_as_rows(values, {"rewards": torch.tensor([1.0, -1.0]), "width": 3})
    assert rows.shape == (HEADS * 2, 3) and torch.equal(rows[2:4], values[..., 1])
    assert batch["rewards"].tolist() == [1.0, -1.0] * HEADS and batch["width"] == 3
    read, spread = read_heads(values, pessimism=2.0)
    torch.testing.assert_close(spread, values.std(-1, correction=0))
    torch.testing.assert_close(read, values.mean(-1) - 2.0 * spread)
    one = torch.randn(2, 3)
    assert read_heads(one, 2.0)[0] is one and read_heads(one, 2.0)[1] is None


@pytest.fixture(scope="module")
def heads_gvm(task, tmp_path_factory) -> Path:
    """A 3-head GVM trained as the demo's (td_pairwise, 150 steps), in bf16."""
    from megatron_dvpo import cpu_compat
    from megatron_dvpo.gvm.train import main

    run = tmp_path_factory.mktemp("heads_gvm")
    try:
        main(["--config", str(REPO / "examples/gvm_tiny.yaml"),
              f"data.train_path={task.root}/pairs_train.jsonl",
              f"data.eval_path={task.root}/pairs_eval.jsonl", f"data.tokenizer={task.tokenizer}",
              f"checkpoint.init_from={task.gvm_init}", f"logging.run_dir={run}",
              f"checkpoint.save_dir={run}/checkpoints", "train_steps=150",
              "checkpoint.save_interval=0", "gvm.eval_interval=0", "logging.log_interval=50",
              "precision.params_dtype=bf16", f"model.value_heads={HEADS}",
              "gvm.value_head_init_std=0.02"])
    finally:
        cpu_compat.uninstall()
    return run


def test_a_k_head_gvm_learns_with_heads_apart(heads_gvm):
    """Held-out pair accuracy as the one-head demo GVM's (99.2% at 300 steps); the saved state
    records how far the heads spread on the training data, and the heads differ."""
    logs = scalars(heads_gvm / "tensorboard")
    assert logs["gvm/pair_acc_last"][-1][1] >= 0.9, logs["gvm/pair_acc_last"]
    saved = heads_gvm / "checkpoints" / "iter_0000150"
    state = json.loads((saved / "train_state.json").read_text())
    assert 0 < state["head_spread_limit"] < 0.5, state
    assert load_config(saved / "config.yaml").model.value_heads == HEADS


def _dvpo(task, gvm: Path, run: Path, *extra: str) -> dict:
    from megatron_dvpo import cpu_compat

    main = importlib.import_module("megatron_dvpo.rl.dvpo").main
    try:
        main(["--config", str(REPO / "examples/dvpo_tiny.yaml"),
              f"data.train_path={task.data}/train.jsonl", "data.eval_path=null",
              f"rl.policy={task.sft}", f"dvpo.gvm={gvm}", "train_steps=1",
              "data.global_batch_size=16", "data.micro_batch_size=8", "rl.true_reward=synthetic:0",
              f"logging.run_dir={run}", "checkpoint.save_dir=null", *extra])
    finally:
        cpu_compat.uninstall()
    return {tag: points[0][1] for tag, points in scalars(run / "tensorboard").items()}


def test_dvpo_reads_the_heads_pessimistically(task, heads_gvm, tmp_path):
    """The same first rollout (the same policy and seed) read with k = 0 and k = 2: each
    response's final value drops by k times its heads' std, and the disagreement is logged."""
    gvm = heads_gvm / "checkpoints" / "iter_0000150"
    plain = _dvpo(task, gvm, tmp_path / "k0")
    pessimistic = _dvpo(task, gvm, tmp_path / "k2", "dvpo.head_pessimism=2")
    assert plain["rollout/response_len_mean"] == pessimistic["rollout/response_len_mean"]
    spread = plain["rollout/gvm_head_std_final"]
    assert spread > 0 and spread == pessimistic["rollout/gvm_head_std_final"]
    drop = plain["rollout/gvm_final_value_mean"] - pessimistic["rollout/gvm_final_value_mean"]
    assert drop == pytest.approx(2 * spread, rel=1e-4)
    assert 0 <= plain["rollout/gvm_head_disagree_rate"] <= 1
    assert 0 < plain["rollout/gvm_head_std_mean"]


def test_head_settings_that_cannot_work_are_refused(task, heads_gvm, tmp_path):
    from megatron_dvpo.data.inputs import check_training_inputs
    from megatron_dvpo.rl.inputs import check_rl_inputs

    cfg = load_config(REPO / "examples/gvm_tiny.yaml", [
        f"data.train_path={task.root}/pairs_train.jsonl", "data.eval_path=null",
        f"data.tokenizer={task.tokenizer}", "model.value_heads=4"])
    with pytest.raises(ConfigError, match="gvm.value_head_init_std > 0"):
        check_training_inputs(cfg, [], value_model=True)
    rl = ["examples/dvpo_tiny.yaml", f"data.train_path={task.data}/train.jsonl",
          f"rl.policy={task.sft}"]
    one_head = load_config(REPO / rl[0], [*rl[1:], f"dvpo.gvm={task.gvm}",
                                         "dvpo.head_pessimism=1"])
    with pytest.raises(ConfigError, match="has one head"):
        check_rl_inputs(one_head)
    critic = load_config(REPO / "examples/dvpo_tiny.yaml", [
        *rl[1:], f"ppo.reward_model={task.gvm}",
        f"ppo.critic={heads_gvm / 'checkpoints' / 'iter_0000150'}"])
    with pytest.raises(ConfigError, match="PPO's critic is trained as one value"):
        check_rl_inputs(critic, value_keys=("ppo.reward_model", "ppo.critic"))
    policy = load_config(REPO / "examples/sft_tiny.yaml", ["model.value_heads=2"])
    with pytest.raises(ConfigError, match="a policy has no value heads"):
        validate_model(policy.model, policy.parallel)
