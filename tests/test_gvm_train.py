"""GVM pretraining end to end on the synthetic task, through the same CLI a user runs."""

import json
import os
from pathlib import Path

import pytest

from conftest import REPO, launch, resumed_from
from megatron_dvpo.demo import scalars

SPEC_TAGS = {"gvm/loss", "gvm/value_mean", "gvm/pair_acc_last", "gvm/pair_acc_mean",
             "perf/step_time_s", "perf/train_tokens_per_s", "perf/peak_mem_gib",
             "data/samples", "data/filtered_rows", "data/truncated_samples", "data/bad_rows"}


@pytest.fixture(scope="module")
def synthetic(models):
    return models.data  # 8000 train rows, 400 held-out rows, rule seed 0


def train(run_dir: Path, data: Path, nproc: int = 1, *overrides: str) -> dict[str, list]:
    """Run the GVM trainer; returns {tag: [(step, value), ...]} from its TensorBoard files."""
    launch(["-m", "megatron_dvpo.gvm.train", "--config", str(REPO / "examples/gvm_tiny.yaml"),
            f"data.train_path={data}/train.jsonl", f"data.eval_path={data}/eval.jsonl",
            f"data.tokenizer={data}/tokenizer.model", f"logging.run_dir={run_dir}",
            f"checkpoint.save_dir={run_dir}/checkpoints", *overrides], nproc=nproc)
    return scalars(run_dir / "tensorboard")


def test_gvm_learns_the_demo_task(task):
    """The demo's stage 5 (shared): seed 1234, 300 steps of 64 samples of the example config
    (td_pairwise) on the SFT policy's pairs: the objective (TD loss + pair loss) falls by 15%,
    held-out pairwise accuracy of the last and of the mean value >= 90%."""
    logs = scalars(task.root / "gvm" / "tensorboard")
    assert SPEC_TAGS <= set(logs)  # real event files, read back with tensorboard
    losses = [v for _, v in logs["gvm/loss_total"]]
    assert losses == pytest.approx([v + 2.0 * pair for (_, v), (_, pair)  # pairwise_weight
                                    in zip(logs["gvm/objective"], logs["gvm/pair_loss"])],
                                   rel=1e-6)
    assert len(losses) >= 50, losses
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5, losses
    final_step, final_acc = logs["gvm/pair_acc_last"][-1]
    assert final_step == 300 and final_acc >= 0.90, logs["gvm/pair_acc_last"]
    steps = [step for step, _ in logs["gvm/pair_acc_last"]]
    assert len(steps) == len(set(steps)), steps  # the final model evaluated once
    assert logs["gvm/pair_acc_mean"][-1][1] >= 0.90
    assert (task.gvm.parent / "latest_checkpointed_iteration.txt").read_text() == "300\n"
    # the checkpoint records the accuracy DVPO checks (dvpo.min_gvm_accuracy)
    state = json.loads((task.gvm / "train_state.json").read_text())
    assert state["held_out_step"] == 300
    assert state["held_out_accuracy"] == pytest.approx(final_acc, rel=1e-6)  # TB: float32


def test_dvpo_refuses_a_gvm_near_chance(tmp_path):
    from megatron_dvpo.config import ConfigError
    from megatron_dvpo.rl.inputs import check_gvm_accuracy

    check_gvm_accuracy(str(tmp_path), 0.6)  # a converted GVM records none: nothing to check
    (tmp_path / "train_state.json").write_text(json.dumps({"held_out_accuracy": 0.53}))
    with pytest.raises(ConfigError, match="at 53.0%, under dvpo.min_gvm_accuracy=0.6"):
        check_gvm_accuracy(str(tmp_path), 0.6)
    check_gvm_accuracy(str(tmp_path), 0.0)


def test_mfu_is_logged_against_the_device_peak(synthetic, tmp_path):
    """perf/mfu = tokens/s x model FLOPs per token (value head: one column) / (devices x peak);
    on a CPU only with logging.peak_tflops (no peak is known)."""
    from megatron_dvpo.config import load_config
    from megatron_dvpo.models.gpt import training_flops_per_token

    logs = train(tmp_path, synthetic, 2, "train_steps=2", "gvm.eval_interval=0",
                 "data.eval_path=null", "logging.peak_tflops=0.5", "logging.log_interval=1")
    model = load_config(tmp_path / "checkpoints" / "iter_0000002" / "config.yaml").model
    assert model.value_head
    flops = training_flops_per_token(model, 32)  # gvm_tiny's data.seq_length
    for (step, mfu), (_, tokens_per_s) in zip(logs["perf/mfu"], logs["perf/train_tokens_per_s"]):
        assert mfu == pytest.approx(tokens_per_s * flops / (2 * 0.5e12), rel=1e-5), step
    assert 0 < logs["perf/mfu"][0][1] < 1


def test_length_filtering_is_counted_in_the_logs(synthetic, tmp_path):
    logs = train(tmp_path, synthetic, 1, "train_steps=1", "gvm.eval_interval=0",
                 "data.eval_path=null", "data.max_length=12")
    assert "perf/mfu" not in logs  # a CPU has no known peak
    filtered = logs["data/filtered_rows"][0][1]
    assert 0 < filtered < 8000
    assert logs["data/samples"][0][1] == 2 * (8000 - filtered)
    truncated = train(tmp_path / "t", synthetic, 1, "train_steps=1", "gvm.eval_interval=0",
                      "data.eval_path=null", "data.max_length=12", "data.length_mode=truncate")
    assert truncated["data/truncated_samples"][0][1] > 0
    assert truncated["data/samples"][0][1] == 16000


def test_evaluate_cli(task, synthetic, tmp_path):
    """The demo's GVM evaluated on its held-out pairs: the numbers its training logged."""
    out = tmp_path / "eval.json"
    proc = launch(["-m", "megatron_dvpo.gvm.evaluate", "--ckpt", str(task.gvm), "--data",
                   f"{task.root}/pairs_eval.jsonl", "--out", str(out),
                   f"logging.run_dir={tmp_path}"], nproc=1)
    result = json.loads(out.read_text())
    pairs = len((task.root / "pairs_eval.jsonl").read_text().splitlines())  # untied samples
    assert result["pairs"] == pairs > 200
    assert set(result["accuracy"]) == {"last", "mean", "p1", "p5", "p10", "p90", "p95", "p99"}
    assert f"pairwise accuracy over {pairs} pairs" in proc.stdout
    logged = scalars(task.root / "gvm" / "tensorboard")["gvm/pair_acc_last"][-1][1]
    assert result["accuracy"]["last"] == pytest.approx(logged)  # same numbers as training's
    ckpt = task.gvm
    # a held-out file that shares the training file's name is its own dataset, not the cache
    # of the training data
    (tmp_path / "heldout").mkdir()
    rows = (synthetic / "eval.jsonl").read_text().splitlines()[:4]
    (tmp_path / "heldout" / "train.jsonl").write_text("\n".join(rows) + "\n")
    os.utime(tmp_path / "heldout" / "train.jsonl", (0, 0))  # written before the training run
    launch(["-m", "megatron_dvpo.gvm.evaluate", "--ckpt", str(ckpt), "--data",
            f"{tmp_path}/heldout/train.jsonl", "--out", str(out),
            f"logging.run_dir={tmp_path}"], nproc=1)
    assert json.loads(out.read_text())["pairs"] == 4


@pytest.mark.multirank
def test_tp2_and_pp2_follow_the_tp1_loss_curve(models, synthetic, tmp_path):
    """From the same initial weights and data, 10 steps at TP=2 and PP=2 track TP=1 to 1e-4."""
    common = ["train_steps=10", "logging.log_interval=1", "gvm.eval_interval=0",
              "data.eval_path=null", "model.num_layers=2"]
    start = f"checkpoint.init_from={models.gvm_init}"
    curves = {}
    for name, nproc, layout in (("tp1", 1, []),
                                ("tp2", 2, ["parallel.tensor_model_parallel_size=2"]),
                                ("pp2", 2, ["parallel.pipeline_model_parallel_size=2"])):
        logs = train(tmp_path / name, synthetic, nproc, *common, start, *layout)
        curves[name] = [v for _, v in logs["gvm/loss"]]
    assert len(curves["tp1"]) == 10
    for name in ("tp2", "pp2"):
        for step, (a, b) in enumerate(zip(curves["tp1"], curves[name]), 1):
            assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (name, step, curves)


@pytest.mark.multirank
def test_resume_continues_exactly(synthetic, tmp_path):
    """DP=2 with the distributed optimizer: a run resumed from an unbroken run's step-10
    checkpoint matches that run's steps 11-20. The unbroken run overlaps the parameter
    all-gather and the resumed one does not: neither changes a number
    (tests/distributed/param_gather.py checks the saved weights directly)."""
    common = ["logging.log_interval=1", "gvm.eval_interval=0", "data.eval_path=null",
              "checkpoint.save_interval=10", "parallel.use_distributed_optimizer=true",
              "data.micro_batch_size=8"]
    overlap = ["parallel.overlap_param_gather=true"]  # the same buckets: the same sums
    unbroken = train(tmp_path / "unbroken", synthetic, 2, "train_steps=20", *common, *overlap)
    resumed_from(tmp_path / "unbroken", tmp_path / "broken", 10)
    resumed = train(tmp_path / "broken", synthetic, 2, "train_steps=20", *common)
    expected = dict(unbroken["gvm/loss"])
    got = dict(resumed["gvm/loss"])
    assert sorted(got) == list(range(11, 21))  # steps 11-20 resumed
    for step in range(11, 21):
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step
    state = json.loads((tmp_path / "broken/checkpoints/iter_0000020/train_state.json").read_text())
    assert state["consumed_samples"] == 20 * 64 and state["step"] == 20


def test_trajectory_context_prefixes_examples_and_keeps_the_response(synthetic, tmp_path,
                                                                      single_rank):
    import math

    import torch

    from megatron_dvpo.config import load_config
    from megatron_dvpo.gvm.train import GVMTrainer

    overrides = [f"data.train_path={synthetic}/train.jsonl", "data.eval_path=null",
                 f"data.tokenizer={synthetic}/tokenizer.model", f"logging.run_dir={tmp_path}",
                 "checkpoint.save_dir=null", "data.seq_length=256", "data.max_length=32",
                 "model.max_position_embeddings=256", "train_steps=3", "data.global_batch_size=8",
                 "data.micro_batch_size=8"]
    config = REPO / "examples/gvm_tiny.yaml"
    plain = GVMTrainer(load_config(config, overrides))._next_batch()
    trainer = GVMTrainer(load_config(config, overrides + ["data.trajectory_context_k=2"]))
    framed = trainer._next_batch()
    assert torch.equal(plain["response_lengths"], framed["response_lengths"])
    assert torch.equal(plain["response_mask"].sum(1), framed["response_mask"].sum(1))
    assert (framed["prompt_lengths"] > plain["prompt_lengths"] + 10).all()
    for row in range(8):
        n = int(plain["response_lengths"][row])
        p, q = int(plain["prompt_lengths"][row]), int(framed["prompt_lengths"][row])
        assert torch.equal(plain["tokens"][row, p:p + n], framed["tokens"][row, q:q + n])
        assert torch.equal(plain["tokens"][row, 1:p], framed["tokens"][row, q - p + 1:q])
    from megatron_dvpo.training.loop import TrainingLoop

    trainer.batches.load_state_dict({"consumed_samples": 0})
    TrainingLoop(trainer.cfg, trainer, trainer.units).run()
    losses = [v for _, v in scalars(tmp_path / "tensorboard")["gvm/loss"]]
    assert losses and all(math.isfinite(v) for v in losses)
