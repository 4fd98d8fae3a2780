"""DVPO end to end on the synthetic task, the frozen GVM, resume, and input errors."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import NPROC, REPO, launch, resumed_from
from megatron_dvpo.config import ConfigError, load_config
from megatron_dvpo.demo import run_events, run_pipeline, scalars
from megatron_dvpo.rl.inputs import check_rl_inputs

SPEC_TAGS = {"policy/loss", "policy/clipfrac", "policy/approx_kl", "policy/ratio_mean",
             "policy/entropy", "policy/grad_norm", "policy/lr", "rollout/response_len_mean",
             "rollout/gvm_final_value_mean", "rollout/kl_ref", "rollout/beta",
             "rollout/adv_mean", "rollout/adv_std", "perf/gen_tokens_per_s",
             "perf/train_tokens_per_s", "perf/step_time_s", "perf/peak_mem_gib",
             "eval/true_reward_mean", "rollout/logprob_diff"}


@pytest.fixture(scope="module")
def pipeline(task):
    """The `make demo` pipeline (2 ranks, seed 1234): DVPO and the export on top of the shared
    stages 1-5."""
    return task.root, run_pipeline(task.root, nproc=NPROC, reuse=True)


@pytest.mark.multirank
def test_dvpo_raises_the_true_reward(pipeline):
    """Seed 1234, 40 DVPO steps of 64 prompts at DP=2: the held-out true reward of the policy
    rises by at least 0.6, from below 0 (the SFT policy's) to above (measured -0.19 -> +0.72
    with gae at lambda 0 over per-sequence whitened values; -0.19 -> +0.28 with the released
    lambda 0.95 and whitening, which this threshold fails)."""
    work, result = pipeline
    assert result["true_reward_after"] >= result["true_reward_before"] + 0.6, result
    assert result["true_reward_before"] < 0 < result["true_reward_after"], result
    assert result["gvm_pair_acc_last"] >= 0.90, result
    logs = scalars(work / "dvpo" / "tensorboard")
    assert SPEC_TAGS <= set(logs), SPEC_TAGS - set(logs)
    assert max(v for _, v in logs["rollout/logprob_diff"]) < 1e-4  # rollout == training numerics
    # constants once, counters only once they count: no flat cards
    assert [step for step, _ in logs["memory/model_state_gib"]] == [1]
    assert [step for step, _ in logs["policy/lr"]] == [1]  # the example's constant LR
    # readable curves: every step, and the held-out reward at the start and every 5 steps
    assert [step for step, _ in logs["rollout/kl_ref"]] == list(range(1, 41))
    assert [step for step, _ in logs["eval/true_reward_mean"]] == list(range(0, 41, 5))
    # the held-out responses' length and truncation beside their reward (OpenRLHF's, NeMo-RL's)
    for step, length in logs["eval/response_len_mean"]:
        assert 1 <= length <= 12 and 0 <= dict(logs["eval/truncated_rate"])[step] <= 1, step
    assert [s for s, _ in logs["eval/response_len_mean"]] == list(range(0, 41, 5))
    # each phase's time; the step's tokens per second per rank; prompt lengths
    for step, train in logs["perf/train_time_s"]:
        phases = sum(dict(logs[f"timing_s/{p}"])[step]
                     for p in ("old_logprob", "advantages", "update"))
        assert phases == pytest.approx(train, rel=1e-6), step
    for (step, tokens), (_, seconds), (_, throughput) in zip(
            logs["perf/tokens"], logs["perf/step_time_s"], logs["perf/throughput"]):
        assert throughput == pytest.approx(tokens / seconds / NPROC, rel=1e-6), step
    assert {"timing_s/scorer", "timing_s/reference", "timing_s/eval", "timing_s/checkpoint",
            "perf/host_mem_gib", "rollout/prompt_len_mean", "rollout/prompt_len_max"} <= set(logs)
    assert 3 <= logs["rollout/prompt_len_min"][0][1] <= logs["rollout/prompt_len_mean"][0][1]
    assert "train/skipped_updates" not in logs and "train/skipped_steps" not in logs
    for name in ("rollout/gvm_final_value", "rollout/response_len", "rollout/adv"):
        for (_, low), (_, mean), (_, high), (_, std) in zip(
                *(logs[f"{name}_{kind}"] for kind in ("min", "mean", "max", "std"))):
            assert low <= mean <= high and 0 <= std <= high - low, name
    # the estimator's advantages before whitening: their own scale, not mean 0 and std 1
    assert any(abs(std - 1.0) > 0.05 for _, std in logs["rollout/adv_std"])
    # a few held-out responses with their true reward, as text at each periodic evaluation
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_events(work / "dvpo" / "tensorboard")),
                              size_guidance={"tensors": 0, "histograms": 0})
    events.Reload()
    # the global batch's distributions (both ranks' responses) beside each step's scalars
    responses = 64  # the example's global batch, one sample per prompt
    for tag, scalar in (("rollout/response_len", "rollout/response_len"),
                        ("rollout/gvm_final_value", "rollout/gvm_final_value"),
                        ("rollout/adv", "rollout/adv")):
        histograms = events.Histograms(f"{tag}_hist")
        assert [h.step for h in histograms] == [s for s, _ in logs[f"{scalar}_mean"]], tag
        for h, (_, low), (_, mean), (_, high), (_, length) in zip(
                histograms, *(logs[f"{scalar}_{kind}"] for kind in ("min", "mean", "max")),
                logs["rollout/response_len_mean"]):
            count = responses * length if tag == "rollout/adv" else responses  # every token
            value = h.histogram_value
            assert value.num == pytest.approx(count) and value.sum / value.num == pytest.approx(
                mean, rel=1e-4, abs=1e-6), (tag, h.step)
            assert (value.min, value.max) == pytest.approx((low, high), rel=1e-4), (tag, h.step)
    kl = events.Histograms("rollout/kl_ref_hist")
    assert [h.histogram_value.sum / responses for h in kl] == pytest.approx(
        [v for _, v in logs["rollout/kl_ref"]], rel=1e-4, abs=1e-6)
    samples = events.Tensors("eval/samples/text_summary")
    steps = [e.step for e in samples]
    assert steps and set(steps) <= {s for s, _ in logs["eval/true_reward_mean"]}, steps
    table = samples[-1].tensor_proto.string_val[0].decode().splitlines()
    assert table[0] == "| prompt | response | true reward |" and len(table) == 2 + 4, table
    # the run's link pins cards the run logged; the Custom Scalars tab: learning, health,
    # speed, every chart matching a logged tag
    from tensorboard.plugins.custom_scalar import layout_pb2

    from megatron_dvpo.rl.dashboard import rl_dashboard
    from megatron_dvpo.rl.scorers import GVMScorer

    assert set(rl_dashboard(GVMScorer.final_value_tag, true_reward=True).pinned) <= set(logs)

    layout = layout_pb2.Layout()
    layout.ParseFromString(events.Tensors("custom_scalars__config__")[0]
                           .tensor_proto.string_val[0])
    assert [c.title for c in layout.category] == ["1. is it learning", "2. is it healthy",
                                                  "3. is it fast"]
    for category in layout.category:
        for chart in category.chart:
            assert any(re.match(regex, tag) for tag in logs
                       for regex in chart.multiline.tag), chart.title


def test_exported_policy_loads_in_transformers(pipeline):
    """The demo exports from the run's save directory, which stands for its latest
    checkpoint."""
    import transformers as tf

    work, result = pipeline
    assert result["exported_from"] == str(work / "dvpo" / "checkpoints" / "iter_0000040")
    model = tf.AutoModelForCausalLM.from_pretrained(work / "hf_trained")
    tokenizer = tf.AutoTokenizer.from_pretrained(work / "hf_trained")
    ids = tokenizer("banana mango", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


def dvpo_overrides(work: Path, run: Path, *extra: str) -> list[str]:
    return [f"data.train_path={work}/synthetic/train.jsonl",
            f"data.eval_path={work}/synthetic/eval.jsonl",
            f"rl.policy={work}/sft/checkpoints/iter_0000100",
            f"dvpo.gvm={work}/gvm/checkpoints/iter_0000300",
            f"logging.run_dir={run}", f"checkpoint.save_dir={run}/checkpoints",
            "logging.log_interval=1", "rl.eval_interval=0", *extra]


def test_frozen_gvm_and_no_reference_without_kl(pipeline, tmp_path, single_rank):
    from megatron.core.distributed import DistributedDataParallel

    from megatron_dvpo.rl.dvpo import DVPO
    from megatron_dvpo.training.loop import TrainingLoop

    work, _ = pipeline
    cfg = load_config(REPO / "examples/dvpo_tiny.yaml",
                      dvpo_overrides(work, tmp_path, "train_steps=2", "rl.kl_coef=0.2",
                                     "checkpoint.save_dir=null", "data.global_batch_size=32"))
    trainer = DVPO(cfg)
    assert trainer.reference is not None  # kl_coef > 0 loads it
    gvm = trainer.scorer.gvm
    assert list(trainer.units) == ["model"]  # the GVM is not a trained unit
    before = {n: p.detach().clone() for c in gvm for n, p in c.named_parameters()}
    trainer.initialize()  # the policy's initial weights (the loop loads them again: no resume)
    policy_before = [p.detach().clone() for p in trainer.policy.chunks[0].parameters()]
    optimized = {id(p) for g in trainer.policy.optimizer.param_groups for p in g["params"]}
    TrainingLoop(cfg, trainer, trainer.units).run()
    for chunk in gvm:
        assert not isinstance(chunk, DistributedDataParallel)
        for name, param in chunk.named_parameters():
            assert not param.requires_grad and param.grad is None
            assert id(param) not in optimized
            assert torch.equal(param, before[name]), name  # bitwise unchanged
    assert any(not torch.equal(p, q) for p, q in zip(trainer.policy.chunks[0].parameters(),
                                                     policy_before))  # the policy did train
    cfg.rl.kl_coef = 0.0
    assert DVPO(cfg).reference is None  # kl_coef = 0: nothing loaded


@pytest.mark.parametrize("target, rises", [(6.0, True), (1e4, False)])
def test_adaptive_kl_follows_the_per_sequence_kl(pipeline, tmp_path, single_rank, target,
                                                 rises):
    """The reference is the random policy before SFT: about 3-5 nats per token, tens per
    sequence. Against the released default target of 6 nats per sequence beta must rise (a
    per-token KL fed to it would make it fall); against a huge target it falls."""
    from megatron_dvpo.rl.dvpo import DVPO

    work, _ = pipeline
    cfg = load_config(REPO / "examples/dvpo_tiny.yaml",
                      dvpo_overrides(work, tmp_path, "train_steps=1", "rl.kl_coef=0.2",
                                     "rl.kl_adaptive=true", f"rl.kl_target={target}",
                                     "rl.kl_horizon=100", f"rl.reference={work}/policy",
                                     "checkpoint.save_dir=null", "data.global_batch_size=32"))
    trainer = DVPO(cfg)
    trainer.initialize()
    metrics = trainer.step(0).metrics
    per_sequence, per_token = metrics["rollout/kl_ref"], metrics["rollout/kl_ref_per_token"]
    assert per_sequence == pytest.approx(per_token * metrics["rollout/response_len_mean"])
    assert per_token < 6.0 < per_sequence < 1e4, metrics
    error = min(max(per_sequence / target - 1, -0.2), 0.2)
    assert trainer.kl.beta == pytest.approx(0.2 * (1 + error * 32 / 100))
    assert (trainer.kl.beta > 0.2) == rises


def test_resume_continues_exactly(pipeline, tmp_path):
    """With the GVM refreshed every 2 steps, so that the GVM unit (weights and optimizer) must
    come back too for steps 4-6 to match: a run resumed from the unbroken run's step-3
    checkpoint continues it exactly."""
    work, _ = pipeline
    common = ["train_steps=6", "data.global_batch_size=32", "rl.kl_coef=0.1",
              "checkpoint.save_interval=3", "dvpo.refresh_interval=2", "dvpo.refresh_lr=1e-3"]

    def run(name, *extra):
        run_dir = tmp_path / name
        launch(["-m", "megatron_dvpo.rl.dvpo", "--config", "examples/dvpo_tiny.yaml",
                *dvpo_overrides(work, run_dir, *common, *extra)], nproc=1)
        return scalars(run_dir / "tensorboard")

    unbroken = run("unbroken")
    resumed_from(tmp_path / "unbroken", tmp_path / "resumed", 3)
    resumed = run("resumed")
    for tag in ("policy/loss", "rollout/true_reward_mean", "rollout/beta", "policy/approx_kl",
                "rollout/gvm_final_value_mean", "gvm_refresh/loss"):
        expected, got = dict(unbroken[tag]), dict(resumed[tag])
        assert sorted(got) == ([4, 6] if tag.startswith("gvm_refresh") else [4, 5, 6]), tag
        for step in sorted(got):
            assert got[step] == pytest.approx(expected[step], abs=1e-6), (tag, step)


@pytest.mark.multirank
def test_overlapped_param_gather_changes_no_number(pipeline, tmp_path):
    """DP=2, the distributed optimizer for the policy and the refreshed GVM: overlapping their
    parameter all-gathers with the next forward pass leaves every logged number as it was."""
    work, _ = pipeline
    common = ["train_steps=4", "data.global_batch_size=16", "data.micro_batch_size=4",
              "rl.kl_coef=0.1", "dvpo.refresh_interval=2", "dvpo.refresh_lr=1e-3",
              "parallel.use_distributed_optimizer=true", "checkpoint.save_interval=0"]

    def run(name, *extra):
        run_dir = tmp_path / name
        launch(["-m", "megatron_dvpo.rl.dvpo", "--config", "examples/dvpo_tiny.yaml",
                *dvpo_overrides(work, run_dir, *common, *extra)], nproc=2)
        return scalars(run_dir / "tensorboard")

    plain, overlapped = run("plain"), run("overlap", "parallel.overlap_param_gather=true")
    for tag in ("policy/loss", "rollout/true_reward_mean", "policy/approx_kl",
                "rollout/gvm_final_value_mean", "gvm_refresh/loss"):
        expected, got = dict(plain[tag]), dict(overlapped[tag])
        assert sorted(got) == sorted(expected) and len(got) >= 2, tag
        for step, value in expected.items():
            assert got[step] == pytest.approx(value, abs=1e-6), (tag, step)
    assert len({round(v, 6) for _, v in plain["policy/loss"]}) > 1  # the policy does move


def fake_checkpoint(src: Path, dst: Path, **model_changes) -> Path:
    """A copy of ``src``'s config (model section edited) next to its real weights."""
    dst.mkdir(parents=True)
    cfg = yaml.safe_load((src / "config.yaml").read_text())
    cfg["model"].update(model_changes)
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg))
    (dst / "model").symlink_to(src / "model", target_is_directory=True)
    return dst


def test_bad_inputs_fail_before_any_work(pipeline, tmp_path):
    work, _ = pipeline
    base = load_config(REPO / "examples/dvpo_tiny.yaml", dvpo_overrides(work, tmp_path))
    gvm = Path(base.dvpo.gvm)

    def expect(message, section="dvpo", **values):
        cfg = load_config(REPO / "examples/dvpo_tiny.yaml", dvpo_overrides(work, tmp_path))
        for key, value in values.items():
            assert hasattr(getattr(cfg, section), key), key
            setattr(getattr(cfg, section), key, value)
        with pytest.raises(ConfigError, match=message):
            check_rl_inputs(cfg)

    expect(r"dvpo.gvm is required", gvm=None)
    expect(r"dvpo.gvm=/nonexistent is not a checkpoint directory", gvm="/nonexistent")
    expect(r"rl.policy=.* holds a value model", section="rl", policy=str(gvm))
    wide = fake_checkpoint(gvm, tmp_path / "wide_gvm", vocab_size=512)
    expect(r"the policy's vocabulary \(256 tokens\) differs from dvpo.gvm's \(512\)",
           gvm=str(wide))

    import sentencepiece as spm

    text = tmp_path / "other.txt"
    text.write_text("\n".join(f"line {i} with other words {i * 7}" for i in range(2000)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "other"),
                                   vocab_size=256, model_type="bpe", pad_id=0, unk_id=1,
                                   bos_id=2, eos_id=3)
    other = fake_checkpoint(gvm, tmp_path / "other_gvm")
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    cfg["data"]["tokenizer"] = str(tmp_path / "other.model")
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    expect(r"the tokenizers differ", gvm=str(other))
    shutil.rmtree(other)


def test_gaming_detectors():
    import torch

    from megatron_dvpo.rl.gaming import gaming_warnings, out_of_range, repeat_counts, truncated

    tokens = torch.tensor([[5, 6, 5, 6, 5], [7, 8, 9, 3, 0], [4, 4, 4, 4, 4]])
    lengths = torch.tensor([5, 4, 5])
    # bigrams: (5,6)(6,5)(5,6)(6,5): 2 repeated of 4; (7,8)(8,9)(9,3): 0 of 3; (4,4) x4: 3 of 4
    assert repeat_counts(tokens, lengths) == (5.0, 11.0)
    assert truncated(tokens, lengths, eos_id=3, max_new_tokens=5).tolist() == [True, False, True]
    assert out_of_range(torch.tensor([-2.0, 0.0, 3.0]), -1.0, 2.0).tolist() == [True, False, True]
    assert gaming_warnings({"r": 0.7, "e": 0.01, "ok": 0.1},
                           {"r": ("max", 0.5), "e": ("min", 0.05), "ok": ("max", 0.5)}) == [
        "r 0.7 > 0.5", "e 0.01 < 0.05"]


def test_a_nearly_constant_gvm_is_named():
    """The bench_methods bigram GVM's recorded range (53% held-out accuracy) is flagged; the
    demo GVM's (99%) and one just at 1% of the label gap are not."""
    from megatron_dvpo.rl.gaming import flat_value_range

    warning = flat_value_range((-0.0144, -0.0106), 2.0)
    assert warning is not None and "span 0.0038" in warning and "gap 2" in warning
    assert flat_value_range((-3.59, 3.52), 2.0) is None
    assert flat_value_range((0.0, 0.02), -2.0) is None
    assert flat_value_range((0.0, 0.0199), 2.0) is not None


def test_a_gvm_that_rewards_repetition_is_caught(pipeline, tmp_path):
    """A GVM trained to prefer one word repeated over varied words: DVPO learns to repeat, the
    repetition detector warns, and with rl.stop_on_gaming the run saves and stops (exit 3)."""
    import json
    import random
    import subprocess
    import sys

    from megatron_dvpo.data.synthetic import WORDS

    work, _ = pipeline
    rng = random.Random(0)
    rows = []
    for i in range(3000):  # rejected: as many distinct words, or one (short is not a way out)
        n = rng.randint(3, 10)
        rows.append({"prompt": " ".join(rng.sample(WORDS, 4)),
                     "chosen": " ".join([rng.choice(WORDS)] * n),
                     "rejected": " ".join(rng.sample(WORDS, n)) if i % 2 else rng.choice(WORDS)})
    (tmp_path / "repeat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    gvm = tmp_path / "gvm"
    launch(["-m", "megatron_dvpo.gvm.train", "--config", "examples/gvm_tiny.yaml",
            f"data.train_path={tmp_path}/repeat.jsonl", "data.eval_path=null",
            f"data.tokenizer={work}/synthetic/tokenizer.model",
            f"checkpoint.init_from={work}/gvm_init", f"logging.run_dir={gvm}",
            f"checkpoint.save_dir={gvm}/checkpoints", "train_steps=150",
            "logging.log_interval=50", "gvm.eval_interval=0"], nproc=1)
    run = tmp_path / "dvpo"
    env = dict(__import__("os").environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "megatron_dvpo.rl.dvpo", "--config",
                           "examples/dvpo_tiny.yaml",
                           *dvpo_overrides(work, run, f"dvpo.gvm={gvm}/checkpoints",
                                           "train_steps=40", "data.global_batch_size=32",
                                           "dvpo.estimator=q", "rl.kl_coef=0",
                                           "rl.length_penalty=0",
                                           "rl.gaming_max_repeat_rate=0.3",
                                           "rl.gaming_max_truncated_rate=1.0",
                                           "rl.stop_on_gaming=true")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "the policy may be gaming its scorer: rollout/repeat_rate" in proc.stdout
    assert "stopped: stopped at step" in proc.stdout
    repeat = dict(scalars(run / "tensorboard")["rollout/repeat_rate"])
    assert repeat[1] < 0.3 < max(repeat.values()), repeat
    assert "rollout/gvm_value_ood_rate" in scalars(run / "tensorboard")
    stopped_at = max(repeat)
    assert (run / "checkpoints" / f"iter_{stopped_at:07d}" / "train_state.json").is_file()


@pytest.mark.multirank
def test_gvm_refresh_stops_the_short_response_exploit(pipeline, tmp_path, single_rank):
    """With dvpo.estimator=td and no KL anchor the demo's policy games its frozen GVM, which
    over-rates very short responses: it falls to ~1-token responses and the held-out true
    reward to 0 (measured -0.18 -> +0.00 at step 20, without refresh). Refreshing the GVM
    every 4 steps on on-policy pairs ranked by the task's scorer stops it: the true reward
    rises by at least 0.5 (measured -0.18 -> +0.70), and the refreshed GVM is checkpointed as
    a unit."""
    from megatron_dvpo.checkpointing import load_model
    from megatron_dvpo.models import build_chunks

    work, _ = pipeline
    run = tmp_path / "refresh"
    launch(["-m", "megatron_dvpo.rl.dvpo", "--config", "examples/dvpo_tiny.yaml",
            *dvpo_overrides(work, run, "train_steps=20", "rl.eval_interval=20",
                            "dvpo.estimator=td", "rl.kl_coef=0", "rl.length_penalty=0",
                            "dvpo.refresh_interval=4",
                            "dvpo.refresh_lr=1e-3", "checkpoint.save_interval=20")], nproc=2)
    logs = scalars(run / "tensorboard")
    reward = [v for _, v in logs["eval/true_reward_mean"]]
    assert reward[-1] >= reward[0] + 0.5, reward
    assert [s for s, _ in logs["gvm_refresh/pairs"]] == [4, 8, 12, 16, 20]
    assert logs["gvm_refresh/pairs"][0][1] == 64
    assert {"gvm_refresh/pair_accuracy_before", "gvm_refresh/tied_rate",
            "gvm_refresh/loss"} <= set(logs)
    saved = run / "checkpoints" / "iter_0000020"
    assert list(yaml.safe_load((saved / "train_state.json").read_text())["units"]) == ["gvm"]
    gvm_dir = work / "gvm" / "checkpoints" / "iter_0000300"
    cfg = load_config(gvm_dir / "config.yaml")
    original, refreshed = build_chunks(cfg, initialize=False), build_chunks(cfg, initialize=False)
    load_model(original, gvm_dir / "model")
    load_model(refreshed, saved / "gvm")
    assert any(not torch.equal(p, q) for p, q in zip(original[0].parameters(),
                                                     refreshed[0].parameters()))


def test_plot_runs_draws_the_key_curves(pipeline, tmp_path):
    """tools/plot_runs.py on the demo's DVPO run: every key panel, as a PNG."""
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "plot_runs.py"),
                           str(pipeline[0] / "dvpo"), "--out", str(tmp_path / "curves.png")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(eval/true_reward_mean, rollout/true_reward_mean, scorer, rollout/kl_ref, " \
           "policy/entropy, rollout/response_len_mean)" in proc.stdout
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = subprocess.run([sys.executable, str(REPO / "tools" / "plot_runs.py"),
                              str(tmp_path / "nothing"), "--out", str(tmp_path / "x.png")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "no such run directory" in missing.stderr


def test_the_dashboard_screenshot(pipeline, tmp_path):
    """tools/screenshot_tensorboard.py renders the page a DVPO run links to, in a headless
    Chromium: Time Series with the six learning cards pinned first, each drawing the run's
    whole line (no point scaled away as an outlier) above the fold at 1920 x 1080 (a card
    without its line shows only the run's dot, ~75 pixels of its colour), and an existing
    picture is not replaced unasked."""
    sys.path.insert(0, str(REPO / "tools"))
    from PIL import Image
    from screenshot_tensorboard import DVPO_PINS, find_browser

    if find_browser() is None:
        pytest.skip("no headless Chromium on this machine (Debian: apt-get install chromium)")
    out = tmp_path / "dashboard.png"
    tool = [sys.executable, str(REPO / "tools" / "screenshot_tensorboard.py"), "--logdir",
            str(pipeline[0] / "dvpo" / "tensorboard"), "--out", str(out)]
    proc = subprocess.run(tool, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"pinned: {', '.join(DVPO_PINS)}" in proc.stdout and len(DVPO_PINS) == 6
    # each card's full range: TensorBoard's default scaling leaves the eval reward's start out
    drawn = re.search(r"(\d+) cards drawn, (\d+) with a line leaving its chart", proc.stdout)
    assert int(drawn[1]) >= 6 and drawn[2] == "0", proc.stdout
    image = Image.open(out).convert("RGB")
    assert image.size == (1920, 1080)

    def line(pixel):  # the first run's colour, #425066, and its anti-aliased edges
        r, g, b = pixel
        return abs(r - 66) < 30 and abs(g - 80) < 30 and abs(b - 102) < 30 and b - r > 20

    drawn = [sum(map(line, image.crop((x, y, x + 420, y + 430)).getdata()))
             for y in (170, 600) for x in (400, 820, 1240)]  # the pinned cards, 3 x 2
    assert min(drawn) > 300, drawn
    again = subprocess.run(tool, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr
