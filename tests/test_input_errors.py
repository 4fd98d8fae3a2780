"""Input errors users can act on: one ``error:`` line before any process group, exit status 2;
save directories standing for their latest checkpoint; models taken from checkpoints; a resumed
run's LR schedule; tokenizers that do not fit the model."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from megatron_dvpo.config import ConfigError, load_config
from megatron_dvpo.demo import scalars


@pytest.fixture(scope="module")
def work(models, tmp_path_factory):
    """Synthetic data, a tiny policy and GVM, and a GVM save directory with two iterations."""
    work = models.linked(tmp_path_factory.mktemp("inputs"))
    proc = cli("megatron_dvpo.gvm.train", gvm_args(work, work / "gvm_run", "train_steps=4",
                                                   "checkpoint.save_interval=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work


def cli(module: str, args: list[str], nproc: int = 0) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node", str(nproc)] if nproc else [sys.executable])
    env = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PATH": "/usr/bin:/bin"}
    return subprocess.run([*launcher, "-m", module, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env)


def gvm_args(work: Path, run: Path, *extra: str) -> list[str]:
    data = work / "synthetic"
    return ["--config", "examples/gvm_tiny.yaml", f"data.train_path={data}/train.jsonl",
            f"data.eval_path={data}/eval.jsonl", f"data.tokenizer={data}/tokenizer.model",
            f"checkpoint.init_from={work}/gvm", f"logging.run_dir={run}",
            f"checkpoint.save_dir={run}/checkpoints", "gvm.eval_interval=0",
            "logging.log_interval=1", "data.global_batch_size=16", "data.micro_batch_size=8",
            *extra]


def dvpo_args(work: Path, run: Path, *extra: str) -> list[str]:
    return ["--config", "examples/dvpo_tiny.yaml",
            f"data.train_path={work}/synthetic/train.jsonl", "data.eval_path=null",
            f"rl.policy={work}/policy", f"dvpo.gvm={work}/gvm_run/checkpoints",
            f"logging.run_dir={run}", "checkpoint.save_dir=null", *extra]


def one_error_line(proc: subprocess.CompletedProcess, expected: str,
                   torchrun: bool = False) -> None:
    """Exactly one ``error:`` line, and no traceback through our code (under torchrun the
    launcher still prints its own summary of the failed workers)."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
    assert expected in errors[0], errors
    assert f'File "{REPO}/megatron_dvpo' not in proc.stderr, proc.stderr[-3000:]
    if not torchrun:
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("module, args, expected", [
    ("megatron_dvpo.gvm.train", ["gvm.lamda=0.9"], "unknown config key 'gvm.lamda' in override"),
    ("megatron_dvpo.gvm.train", ["data.train_path=/nowhere/train.jsonl"],
     "input file /nowhere/train.jsonl does not exist"),
    ("megatron_dvpo.gvm.train", ["parallel.tensor_model_parallel_size=3"],
     "world size 1 is not divisible by tensor_model_parallel_size=3"),
    ("megatron_dvpo.rl.dvpo", ["train_steps=abc"],
     "command line 'train_steps=abc': train_steps: expected an integer"),
    ("megatron_dvpo.rl.dvpo", ["data.micro_batch_size=0"],
     "data.micro_batch_size must be > 0, got 0"),
    ("megatron_dvpo.rl.ppo", ["ppo.reward_model=/nowhere"],
     "ppo.reward_model=/nowhere is not a checkpoint directory"),
    ("megatron_dvpo.rl.dvpo", ["dvpo.refresh_interval=2", "rl.true_reward=null"],
     "dvpo.refresh_interval=2 ranks on-policy pairs with a scorer: set dvpo.refresh_scorer"),
    ("megatron_dvpo.rl.dvpo", ["dvpo.refresh_interval=2", "dvpo.refresh_scorer=nomodule:f"],
     "dvpo.refresh_scorer='nomodule:f': cannot import module 'nomodule'"),
])
def test_trainer_input_errors_are_one_line_before_any_work(work, tmp_path, module, args,
                                                           expected):
    base = (gvm_args(work, tmp_path) if module.endswith("gvm.train")
            else dvpo_args(work, tmp_path))
    proc = cli(module, base + args)
    one_error_line(proc, expected)
    assert proc.returncode == 2
    assert not (tmp_path / "tensorboard").exists()  # no trainer was built


@pytest.mark.parametrize("algorithm, args, expected", [
    ("GRPO", ["grpo.scorer=synthetic:0", "rollout.n_samples=2", "rollout.guide_beta=1"],
     "rollout.guide_beta=1.0: GRPO has no value model to guide decoding with"),
    ("DVPO", ["rollout.guide_beta=1", "dvpo.refresh_interval=2", "rl.true_reward=synthetic:0"],
     "GVM-guided decoding needs a frozen GVM on the device"),
])
def test_guided_decoding_is_refused_where_it_cannot_run(work, tmp_path, algorithm, args,
                                                        expected):
    """Only an algorithm with a guide hook (DVPO's frozen GVM) takes rollout.guide_beta."""
    from megatron_dvpo.rl.dvpo import DVPO
    from megatron_dvpo.rl.grpo import GRPO

    cfg = load_config(REPO / "examples/dvpo_tiny.yaml", dvpo_args(work, tmp_path)[2:] + args)
    with pytest.raises(ConfigError, match=expected):
        {"DVPO": DVPO, "GRPO": GRPO}[algorithm].check_inputs(cfg)


@pytest.mark.multirank
def test_under_torchrun_the_error_is_printed_once(work, tmp_path):
    proc = cli("megatron_dvpo.rl.dvpo", dvpo_args(work, tmp_path, "dvpo.estimator=qq"),
               nproc=2)
    one_error_line(proc, "dvpo.estimator: 'qq' is not one of", torchrun=True)


def test_save_directories_stand_for_their_latest_checkpoint(work, tmp_path):
    from megatron_dvpo.checkpointing import resolve_checkpoint_dir

    save_dir = work / "gvm_run" / "checkpoints"
    assert resolve_checkpoint_dir(save_dir, "dvpo.gvm") == save_dir / "iter_0000004"
    assert resolve_checkpoint_dir(save_dir / "iter_0000002", "x") == save_dir / "iter_0000002"
    with pytest.raises(ConfigError, match=r"checkpoint.init_from=.* nor a save directory"):
        resolve_checkpoint_dir(tmp_path, "checkpoint.init_from")
    proc = cli("megatron_dvpo.gvm.evaluate", ["--ckpt", str(save_dir), "--data",
                                              f"{work}/synthetic/eval.jsonl", "--out",
                                              str(tmp_path / "eval.json"),
                                              f"logging.run_dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"--ckpt={save_dir}: using its latest checkpoint, iter_0000004" in proc.stdout
    # checkpoint.init_from and rl.policy/dvpo.gvm are resolved (and recorded) the same way
    from megatron_dvpo.rl.dvpo import DVPO
    from megatron_dvpo.gvm.train import check_training_inputs

    cfg = load_config(REPO / "examples/gvm_tiny.yaml",
                      gvm_args(work, tmp_path)[2:] + [f"checkpoint.init_from={save_dir}"])
    check_training_inputs(cfg, [], value_model=True)
    assert cfg.checkpoint.init_from == str(save_dir / "iter_0000004")
    cfg = load_config(REPO / "examples/dvpo_tiny.yaml", dvpo_args(work, tmp_path)[2:])
    DVPO.check_inputs(cfg)
    assert cfg.dvpo.gvm == str(save_dir / "iter_0000004")


def test_gvm_takes_its_model_from_init_from(work, tmp_path):
    """The YAML's model section is replaced by the starting checkpoint's; a command-line
    override that would change a parameter shape names the key instead of failing in the
    checkpoint loader."""
    from megatron_dvpo.gvm.train import check_training_inputs

    overrides = gvm_args(work, tmp_path)[2:]
    yaml_text = yaml.safe_load((REPO / "examples/gvm_tiny.yaml").read_text())
    yaml_text["model"]["num_layers"] = 6
    yaml_text["model"]["hidden_size"] = 32
    config = tmp_path / "other_model.yaml"
    config.write_text(yaml.safe_dump(yaml_text))
    cfg = load_config(config, overrides)
    check_training_inputs(cfg, overrides, value_model=True)
    assert (cfg.model.num_layers, cfg.model.hidden_size) == (2, 64)  # the checkpoint's
    bad = overrides + ["model.num_layers=4"]
    with pytest.raises(ConfigError, match=r"command line 'model.num_layers=4': "
                                          r"checkpoint.init_from=.* has model.num_layers=2"):
        check_training_inputs(load_config(config, bad), bad, value_model=True)
    fine = overrides + ["model.hidden_dropout=0.1"]  # not a shape: allowed
    cfg = load_config(config, fine)
    check_training_inputs(cfg, fine, value_model=True)
    assert cfg.model.hidden_dropout == 0.1
    proc = cli("megatron_dvpo.gvm.train", gvm_args(work, tmp_path, "model.hidden_size=32"))
    one_error_line(proc, "command line 'model.hidden_size=32'")


def test_a_gvm_can_start_from_a_policy_checkpoint(work, tmp_path):
    """checkpoint.init_from a policy: its trunk, a zero value head."""
    proc = cli("megatron_dvpo.gvm.train", gvm_args(work, tmp_path, "train_steps=2",
                                                   f"checkpoint.init_from={work}/policy"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "initialised weights from" in proc.stdout


def test_resuming_with_another_lr_is_refused_unless_overridden(work, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(work / "gvm_run", run, symlinks=True)
    common = ["checkpoint.save_interval=0", "train_steps=4"]
    proc = cli("megatron_dvpo.gvm.train", gvm_args(work, run, *common, "optimizer.lr=1e-3"))
    one_error_line(proc, "optimizer.lr: 0.001 here, 0.003 in the checkpoint")
    assert "checkpoint.override_scheduler=true" in proc.stderr
    proc = cli("megatron_dvpo.gvm.train", gvm_args(work, run, "checkpoint.save_interval=0",
                                                   "train_steps=6", "optimizer.lr=1e-3",
                                                   "checkpoint.override_scheduler=true"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the copy logs under its own name (<run_dir>/tensorboard/<run_dir's name>), beside the
    # copied run's events
    lr = {**dict(scalars(run / "tensorboard" / "gvm_run")["gvm/lr"]),
          **dict(scalars(run / "tensorboard" / "run")["gvm/lr"])}
    # still in the 10-step warmup: step k's LR is k/10 of the peak, now 1e-3, not 3e-3
    assert lr[4] == pytest.approx(3e-3 * 4 / 10) and lr[6] == pytest.approx(1e-3 * 6 / 10), lr
    saved = yaml.safe_load((run / "checkpoints/iter_0000006/config.yaml").read_text())
    assert saved["optimizer"]["lr"] == 1e-3


def fake_checkpoint(src: Path, dst: Path, section: str = "model", **changes) -> Path:
    """``src``'s config with changes to one section, next to its real weights (never loaded
    here)."""
    dst.mkdir(parents=True)
    cfg = yaml.safe_load((src / "config.yaml").read_text())
    cfg[section].update(changes)
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg))
    (dst / "model").symlink_to(src / "model", target_is_directory=True)
    if (src / "tokenizer").is_dir():
        (dst / "tokenizer").symlink_to(src / "tokenizer", target_is_directory=True)
    return dst


def test_tokenizer_larger_than_the_model_is_refused(work, tmp_path):
    from megatron_dvpo.data.tokenizer import TokenizerError
    from megatron_dvpo.rl.dvpo import DVPO

    gvm = work / "gvm_run" / "checkpoints" / "iter_0000004"
    policy = fake_checkpoint(work / "policy", tmp_path / "policy", vocab_size=200)
    small_gvm = fake_checkpoint(gvm, tmp_path / "gvm", vocab_size=200)
    args = dvpo_args(work, tmp_path, f"rl.policy={policy}", f"dvpo.gvm={small_gvm}")
    with pytest.raises(TokenizerError, match=r"has 256 tokens but rl.policy=.* has "
                                             r"model.vocab_size=200"):
        DVPO.check_inputs(load_config(REPO / "examples/dvpo_tiny.yaml", args[2:]))
    proc = cli("megatron_dvpo.sample", ["--policy", str(policy), "--prompts",
                                             f"{work}/synthetic/eval.jsonl", "--out",
                                             str(tmp_path / "out.jsonl")])
    one_error_line(proc, "has 256 tokens but --policy")
    assert not (tmp_path / "out.jsonl").exists()


def test_prompt_plus_new_tokens_must_fit_the_context(work, tmp_path):
    from megatron_dvpo.rl.dvpo import DVPO

    args = dvpo_args(work, tmp_path, "rollout.max_new_tokens=60")[2:]
    with pytest.raises(ConfigError, match=r"rollout.max_prompt_length=16 \+ "
                                          r"rollout.max_new_tokens=60 = 76 exceeds "
                                          r"model.max_position_embeddings=64 of rl.policy="):
        DVPO.check_inputs(load_config(REPO / "examples/dvpo_tiny.yaml", args))
    args = dvpo_args(work, tmp_path, "rollout.min_new_tokens=12")[2:]
    with pytest.raises(ConfigError, match=r"rollout.min_new_tokens=12 must be below "
                                          r"rollout.max_new_tokens=12"):
        DVPO.check_inputs(load_config(REPO / "examples/dvpo_tiny.yaml", args))


def test_an_estimator_never_reads_an_untrained_output(work, tmp_path):
    """td and gae read q_-1 = V(s_0): a qview GVM trained without gvm.train_prompt_value is
    refused for them, and accepted for q (which reads q_t only) or when released-aligned."""
    from megatron_dvpo.rl.dvpo import DVPO

    gvm = work / "gvm_run" / "checkpoints" / "iter_0000004"
    untrained = fake_checkpoint(gvm, tmp_path / "no_prompt_value", "gvm",
                                train_prompt_value=False)
    released = fake_checkpoint(gvm, tmp_path / "released", "gvm", train_prompt_value=False,
                               alignment="released")

    def check(gvm_dir, estimator):
        args = dvpo_args(work, tmp_path, f"dvpo.gvm={gvm_dir}", f"dvpo.estimator={estimator}")
        DVPO.check_inputs(load_config(REPO / "examples/dvpo_tiny.yaml", args[2:]))

    for estimator in ("td", "gae"):
        with pytest.raises(ConfigError, match=rf"dvpo.estimator={estimator} reads q_-1 = V\(s_0\)"
                                              r", which dvpo.gvm=.* never trained"):
            check(untrained, estimator)
        check(released, estimator)
    check(untrained, "q")
