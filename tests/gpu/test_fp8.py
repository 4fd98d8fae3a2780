"""FP8 policy training on a GPU: it tracks bf16, and the colocated GVM stays bf16 and frozen.

Skipped, with the reason, without CUDA and Transformer Engine, and per recipe where the precision
check says this GPU or TE cannot run it (e.g. blockwise off Hopper). Run with `make test-gpu`.

Stated tolerance: over 20 SFT steps on the synthetic task from the same weights and data, the
FP8 loss stays within 5% (relative) of the bf16 loss at every step, and both fall by >= 20%.
"""

import importlib.util

import pytest
import torch

from conftest import launch
from megatron_dvpo.demo import scalars
from test_bf16 import dvpo_keeps_its_frozen_models_bf16_and_unchanged

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                       reason="needs transformer_engine (NGC PyTorch container or the gpu extra)"),
]

SHAPE = ("--layers", "4", "--hidden", "256", "--heads", "8", "--kv-heads", "2", "--dtype", "bf16")
STEPS = 20
TOLERANCE = 0.05
FP8 = ["precision.params_dtype=bf16", "precision.fp8=hybrid"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The task's data and a 4 x 256 bf16 policy, also as a zero-head GVM (``gvm_init``)."""
    from megatron_dvpo.demo import task_and_models

    work = tmp_path_factory.mktemp("fp8")
    task_and_models(work, shape=SHAPE)
    return work


def require(overrides: list[str], work) -> None:
    """Skip, with the precision check's reason, what this GPU or TE cannot run."""
    from megatron_dvpo.config import ConfigError, load_config
    from megatron_dvpo.models.precision import Hardware, plan_precision

    cfg = load_config(work / "policy" / "config.yaml", overrides)
    try:
        plan_precision(cfg.precision, cfg.parallel, cfg.model, Hardware.detect())
    except ConfigError as err:
        pytest.skip(str(err))


def sft_losses(work, name: str, overrides: list[str]) -> list[float]:
    run = work / name
    launch(["-m", "megatron_dvpo.sft", "--config", "examples/sft_tiny.yaml",
            f"data.train_path={work}/synthetic/train.jsonl",
            f"data.tokenizer={work}/synthetic/tokenizer.model",
            f"checkpoint.init_from={work}/policy", "checkpoint.save_dir=null",
            f"logging.run_dir={run}", "logging.log_interval=1", f"train_steps={STEPS}",
            "data.seq_length=64", "optimizer.lr=1e-3", *overrides], nproc=1)
    return [value for _, value in scalars(run / "tensorboard")["sft/loss"]]


@pytest.fixture(scope="module")
def bf16_losses(models):
    return sft_losses(models, "sft_bf16", ["precision.params_dtype=bf16"])


@pytest.mark.parametrize("extra", [
    ["precision.fp8_recipe=delayed"],
    ["precision.fp8_recipe=tensorwise"],
    ["precision.fp8_recipe=blockwise"],
    ["precision.fp8_recipe=tensorwise", "precision.num_layers_at_start_in_bf16=1",
     "precision.num_layers_at_end_in_bf16=1"],
    ["precision.fp8_recipe=tensorwise", "parallel.use_distributed_optimizer=true",
     "precision.fp8_param_gather=true"],
], ids=["delayed", "tensorwise", "blockwise", "tensorwise-bf16-ends", "tensorwise-fp8-params"])
def test_fp8_training_tracks_bf16(models, bf16_losses, extra):
    require(FP8 + extra, models)
    fp8 = sft_losses(models, "sft_" + "_".join(e.split("=")[-1] for e in extra), FP8 + extra)
    assert len(fp8) == len(bf16_losses) == STEPS
    relative = [abs(a - b) / b for a, b in zip(fp8, bf16_losses)]
    print(f"{extra}: bf16 {bf16_losses[0]:.4f} -> {bf16_losses[-1]:.4f}, fp8 {fp8[0]:.4f} -> "
          f"{fp8[-1]:.4f}, max relative gap {max(relative):.4f}")
    assert max(relative) <= TOLERANCE
    for losses in (fp8, bf16_losses):
        assert losses[-1] <= 0.8 * losses[0]


def test_fp8_dvpo_keeps_the_gvm_bf16_and_frozen(models, tmp_path):
    overrides = FP8 + ["precision.fp8_recipe=tensorwise"]
    require(overrides, models)
    trainer = dvpo_keeps_its_frozen_models_bf16_and_unchanged(
        models / "policy", models / "gvm_init", models / "synthetic", tmp_path, overrides)
    assert trainer.policy.chunks[0].config.fp8 == "hybrid"
    diff = [v for _, v in scalars(tmp_path / "tensorboard")["rollout/logprob_diff"]]
    print("rollout (bf16) vs training (FP8) mean |d logprob| per step:", diff)
    assert all(0 < d < 0.5 for d in diff)  # FP8 numerics differ from bf16, but not wildly
