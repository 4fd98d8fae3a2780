"""bf16, as users train: every trainer runs in bf16 (megatron's mixed-precision optimizer with
fp32 main copies), saves, resumes bit for bit, and skips no update; a model loaded into a
trained unit keeps its loaded weights across the first step.

The trainers run through their command lines' ``main`` in this process (each run builds and
tears down its own one-rank process group, as a launch would): four steps saved at step 2, then
a run resumed from that checkpoint (``resumed_from``) must log the same steps 3-4 and end with
the same weights, bit for bit, in every trained unit.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import REPO, resumed_from
from distributed.losses import mean_logprob_loss
from megatron_dvpo.demo import scalars

BF16 = ["precision.params_dtype=bf16", "train_steps=4", "checkpoint.save_interval=2",
        "logging.log_interval=1"]


def rl(task, *extra: str) -> list[str]:
    return ["examples/dvpo_tiny.yaml", f"data.train_path={task.data}/train.jsonl",
            "data.eval_path=null", f"rl.policy={task.sft}", "rl.eval_interval=0",
            "data.global_batch_size=16", "data.micro_batch_size=8", "rl.kl_coef=0.05",
            "rl.true_reward=synthetic:0", *extra]


def value_model(task, objective: str) -> list[str]:
    return ["examples/gvm_tiny.yaml", f"data.train_path={task.root}/pairs_train.jsonl",
            "data.eval_path=null", f"data.tokenizer={task.tokenizer}",
            f"checkpoint.init_from={task.gvm_init}", f"gvm.objective={objective}",
            "data.global_batch_size=16", "data.micro_batch_size=8", "gvm.eval_interval=0"]


# name -> (module with main(argv), config and overrides, trained units)
TRAINERS = {
    "sft": ("megatron_dvpo.sft", lambda t: [
        "examples/sft_tiny.yaml", f"data.train_path={t.data}/train.jsonl",
        f"data.tokenizer={t.tokenizer}", f"checkpoint.init_from={t.policy}",
        "data.global_batch_size=16", "data.micro_batch_size=8"], ["model"]),
    "gvm_td": ("megatron_dvpo.gvm.train", lambda t: value_model(t, "td"), ["model"]),
    "gvm_td_pairwise": ("megatron_dvpo.gvm.train", lambda t: value_model(t, "td_pairwise"),
                        ["model"]),
    "gvm_heads": ("megatron_dvpo.gvm.train", lambda t: [
        *value_model(t, "td_pairwise"), "model.value_heads=3", "gvm.value_head_init_std=0.02"],
        ["model"]),
    "reward_model": ("megatron_dvpo.gvm.train", lambda t: value_model(t, "bradley_terry"),
                     ["model"]),
    "dvpo": ("megatron_dvpo.rl.dvpo", lambda t: rl(t, f"dvpo.gvm={t.gvm}",
                                                   "dvpo.gvm_offload=true"), ["model"]),
    "dvpo_refresh": ("megatron_dvpo.rl.dvpo", lambda t: rl(
        t, f"dvpo.gvm={t.gvm}", "dvpo.refresh_interval=2", "dvpo.refresh_lr=1e-3"),
        ["model", "gvm"]),
    "ppo": ("megatron_dvpo.rl.ppo", lambda t: rl(t, f"ppo.reward_model={t.reward_model}"),
            ["model", "critic"]),
    "grpo": ("megatron_dvpo.rl.grpo", lambda t: rl(
        t, f"grpo.reward_model={t.reward_model}", "rollout.n_samples=4",
        "data.global_batch_size=4"), ["model"]),
    "rloo": ("megatron_dvpo.rl.grpo", lambda t: rl(
        t, "grpo.scorer=synthetic:0", "grpo.estimator=rloo", "rollout.n_samples=4",
        "data.global_batch_size=4"), ["model"]),
    "dpo": ("megatron_dvpo.rl.dpo", lambda t: [
        "examples/sft_tiny.yaml", f"data.train_path={t.root}/pairs_train.jsonl",
        "data.eval_path=null", f"data.tokenizer={t.tokenizer}",
        f"checkpoint.init_from={t.sft}", "data.global_batch_size=8",
        "data.micro_batch_size=4", "optimizer.lr=1e-3"], ["model"]),
}
NOT_REPRODUCIBLE = ("perf/", "timing_s/", "memory/")  # wall-clock rates and times


@pytest.fixture(autouse=True)
def cpu_accommodations_removed_after():
    """The runs install megatron_dvpo.cpu_compat in this process, as a launch would."""
    from megatron_dvpo import cpu_compat

    yield
    cpu_compat.uninstall()


def train(module: str, config: list[str], run: Path) -> dict:
    import importlib

    main = importlib.import_module(module).main
    main(["--config", str(REPO / config[0]), *config[1:], *BF16, f"logging.run_dir={run}",
          f"checkpoint.save_dir={run}/checkpoints"])
    return scalars(run / "tensorboard")


def weights(run: Path, unit: str) -> dict[str, torch.Tensor]:
    from megatron_dvpo import distributed
    from megatron_dvpo.checkpointing import read_model
    from megatron_dvpo.config import ParallelConfig, load_config
    from megatron_dvpo.models import build_chunks

    saved = run / "checkpoints" / "iter_0000004"
    cfg = load_config(saved / "config.yaml")
    if unit != "model":  # a scoring unit: the model it started from
        source = {"critic": cfg.ppo.critic or cfg.ppo.reward_model, "gvm": cfg.dvpo.gvm}[unit]
        cfg.model = load_config(Path(source) / "config.yaml").model
    distributed.init_distributed(ParallelConfig(), seed=0)
    try:
        read = read_model(build_chunks(cfg, initialize=False), saved / unit, torch.float32)
    finally:
        distributed.shutdown()
    return read["model"]


def assert_resumed_run_matches(unbroken_dir: Path, resumed_dir: Path, units: list[str]) -> None:
    """The run resumed at step 2 logs steps 3-4 as the unbroken run did and ends with its
    weights in every trained unit, bit for bit; neither skipped an update."""
    unbroken, resumed = scalars(unbroken_dir / "tensorboard"), scalars(resumed_dir / "tensorboard")
    for run in (unbroken, resumed):
        assert "train/skipped_updates" not in run, run["train/skipped_updates"]  # none skipped
    compared = [tag for tag in unbroken if not tag.startswith(NOT_REPRODUCIBLE)
                and len(unbroken[tag]) == 4]
    assert len(compared) >= 3, sorted(unbroken)  # e.g. SFT: loss, grad_norm, lr
    for tag in compared:
        assert [s for s, _ in resumed[tag]] == [3, 4], tag
        for step, value in resumed[tag]:
            expected = dict(unbroken[tag])[step]
            assert value == expected or (math.isnan(value) and math.isnan(expected)), (
                tag, step, value, expected)
    for unit in units:
        expected, got = weights(unbroken_dir, unit), weights(resumed_dir, unit)
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), (unit, key)


@pytest.mark.parametrize("name", TRAINERS)
def test_bf16_trains_saves_and_resumes_bit_for_bit(task, reward_model, tmp_path, name):
    module, config, units = TRAINERS[name]
    train(module, config(task), tmp_path / "unbroken")
    resumed_from(tmp_path / "unbroken", tmp_path / "resumed", 2)
    train(module, config(task), tmp_path / "resumed")
    assert_resumed_run_matches(tmp_path / "unbroken", tmp_path / "resumed", units)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_a_loaded_model_keeps_its_weights_across_the_first_step(models, single_rank, dtype):
    """The optimizer's fp32 main copy is made when the trained unit is built, before the
    weights are loaded: after the first applied step the weights must be the loaded ones moved
    by about the step (Adam: ~lr per element), never the pre-load weights moved by it. fp16's
    loss scaling skips updates until its scale fits: the first applied one counts."""
    from megatron_dvpo.config import load_config
    from megatron_dvpo.models import build_chunks, forward
    from megatron_dvpo.training.trained_model import TrainedModel

    lr = 1e-3
    cfg = load_config(models.policy / "config.yaml", [f"precision.params_dtype={dtype}",
                                                      f"optimizer.lr={lr}",
                                                      "optimizer.lr_decay_style=constant"])
    unit = TrainedModel(build_chunks(cfg, initialize=False), cfg.optimizer, cfg.parallel,
                        cfg.precision, 100)
    unit.load_weights(models.policy)
    loaded = [p.detach().float().clone() for p in unit.chunks[0].parameters()]
    tokens = torch.randint(4, 200, (4, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(60):
        result = unit.update(forward.make_microbatches(2, tokens=tokens),
                             forward.policy_logprobs_head(cfg.model.vocab_size),
                             mean_logprob_loss())
        if result.applied:
            break
    assert result.applied, result
    ulp = 2.0 ** -8 if dtype == "bf16" else 2.0 ** -11  # relative rounding of the weights
    moved = 0.0
    for before, param in zip(loaded, unit.chunks[0].parameters()):
        change = (param.detach().float() - before).abs()
        assert (change <= 1.5 * lr + ulp * before.abs()).all(), (
            dtype, change.max().item(), before.abs().max().item())
        moved = max(moved, change.max().item())
    assert moved > 0.5 * lr  # a real step was taken


def test_the_distributed_optimizer_takes_its_main_copy_from_the_checkpoint(models,
                                                                          single_rank):
    """bf16 parameters loaded from an fp32 checkpoint: the distributed optimizer's fp32 main
    copy holds the checkpoint's values, not the bf16-rounded weights (megatron's state-dict
    path; with FP8 primary weights the rounding would be to 8 bits)."""
    from megatron_dvpo.checkpointing import read_model
    from megatron_dvpo.config import load_config
    from megatron_dvpo.models import build_chunks
    from megatron_dvpo.training.trained_model import TrainedModel

    cfg = load_config(models.policy / "config.yaml", ["precision.params_dtype=bf16",
                                                      "parallel.use_distributed_optimizer=true"])
    unit = TrainedModel(build_chunks(cfg, initialize=False), cfg.optimizer, cfg.parallel,
                        cfg.precision, 10)
    unit.load_weights(models.policy)
    checkpoint = read_model(unit.chunks, models.policy / "model")["model"]
    names = {id(p): n for n, p in unit.chunks[0].named_parameters()}
    optimizer = getattr(unit.optimizer, "chained_optimizers", [unit.optimizer])[0]
    compared = rounded = 0
    for group, mains in zip(optimizer.model_float16_groups,
                            optimizer.shard_fp32_from_float16_groups):
        for param, main in zip(group, mains):
            span = optimizer._get_model_param_range_map(param)["param"]
            expected = checkpoint[names[id(param)]].reshape(-1)[span.start:span.end]
            assert torch.equal(main, expected), names[id(param)]
            rounded += int(not torch.equal(expected, expected.bfloat16().float()))
            compared += 1
    assert compared == len(names) and rounded > 0  # fp32 values bf16 cannot hold were kept


def dvpo_keeps_its_frozen_models_bf16_and_unchanged(policy: Path, gvm: Path, data: Path,
                                                   run: Path, precision: list[str]):
    """Three DVPO steps in-process with ``precision`` for the policy: the GVM and the reference
    run forward-only in bf16 (FP8 never reaches them), with no gradient, and keep every weight
    bit for bit; the policy trains. Returns the trainer (tests/gpu/test_fp8.py adds FP8's
    checks)."""
    from megatron_dvpo import distributed
    from megatron_dvpo.config import ParallelConfig, load_config
    from megatron_dvpo.rl.dvpo import DVPO
    from megatron_dvpo.training.loop import TrainingLoop

    cfg = load_config(REPO / "examples/dvpo_tiny.yaml", [
        f"rl.policy={policy}", f"dvpo.gvm={gvm}", "rl.kl_coef=0.1",
        f"data.train_path={data}/train.jsonl", "data.eval_path=null",
        "rl.true_reward=null", "rl.eval_interval=0", f"logging.run_dir={run}",
        "logging.log_interval=1", "checkpoint.save_dir=null", "train_steps=3",
        "data.global_batch_size=32", *precision])
    distributed.init_distributed(ParallelConfig(), cfg.seed)
    try:
        trainer = DVPO(cfg)
        frozen = {"gvm": trainer.scorer.gvm, "reference": trainer.reference}
        for name, chunks in frozen.items():
            assert chunks[0].config.fp8 is None, name  # bf16 inference, never FP8
            assert {p.dtype for c in chunks for p in c.parameters()} == {torch.bfloat16}, name
        before = {name: [p.detach().clone() for c in chunks for p in c.parameters()]
                  for name, chunks in frozen.items()}
        trainer.initialize()
        policy_before = [p.detach().clone() for p in trainer.policy.chunks[0].parameters()]
        TrainingLoop(cfg, trainer, trainer.units).run()
        for name, chunks in frozen.items():
            params = [p for c in chunks for p in c.parameters()]
            assert all(not p.requires_grad and p.grad is None for p in params), name
            assert all(torch.equal(p, q) for p, q in zip(params, before[name])), name
        assert any(not torch.equal(p, q) for p, q in zip(trainer.policy.chunks[0].parameters(),
                                                         policy_before))
    finally:
        distributed.shutdown()
    logs = scalars(run / "tensorboard")
    assert "train/skipped_updates" not in logs  # logged once an update is skipped
    return trainer


def test_bf16_dvpo_keeps_its_frozen_models_bf16_and_unchanged(task, tmp_path):
    """What tests/gpu/test_fp8.py checks under FP8, here with a bf16 policy."""
    dvpo_keeps_its_frozen_models_bf16_and_unchanged(task.sft, task.gvm, task.data, tmp_path,
                                                    ["precision.params_dtype=bf16"])


def test_trained_units_get_their_weights_in_one_place():
    """Every model with an optimizer is loaded through ``TrainedModel.load_weights``, which
    refreshes the optimizer's main copy; ``load_model`` is called only by the checkpoint code,
    ``load_weights`` and the builders of forward-only models. (PPO's critic once called
    ``load_model`` directly: in bf16 its first step wrote back the weights it had before
    loading, uninitialised memory, and every update was skipped for NaN.)"""
    import ast

    package = REPO / "megatron_dvpo"
    callers = set()
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for function in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
            for call in (n for n in ast.walk(function) if isinstance(n, ast.Call)):
                if getattr(call.func, "id", None) == "load_model":
                    callers.add(f"{path.relative_to(package).as_posix()}:{function.name}")
    assert callers == {"training/trained_model.py:load_weights", "rl/scorers.py:frozen_model",
                       "sample.py:main", "gvm/evaluate.py:load_value_model"}, callers
