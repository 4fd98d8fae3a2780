"""Signals, kill -9 mid-save, and NaN steps, on a real training process (no Slurm needed)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, ScaledLossJob, assert_identical, checkpoint_contents
from distributed.losses import mean_logprob_loss
from megatron_dvpo.checkpointing import complete_checkpoints, find_latest_checkpoint
from megatron_dvpo.demo import scalars


@pytest.fixture(scope="module")
def synthetic(models):
    return models.data


def command(data: Path, run: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "megatron_dvpo.gvm.train", "--config",
            str(REPO / "examples/gvm_tiny.yaml"), f"data.train_path={data}/train.jsonl",
            f"data.tokenizer={data}/tokenizer.model", "data.eval_path=null",
            f"logging.run_dir={run}", f"checkpoint.save_dir={run}/checkpoints",
            "logging.log_interval=1", "gvm.eval_interval=0", *overrides]


def env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)


def losses(run_dir: Path) -> dict[int, float]:
    return dict(scalars(run_dir / "tensorboard")["gvm/loss"])


STEPS = ["train_steps=30", "checkpoint.save_interval=5"]
LAUNCH = [sys.executable, "-m", "megatron_dvpo.launch", "--standalone", "--nproc-per-node", "1"]


@pytest.fixture(scope="module")
def unbroken(synthetic, tmp_path_factory):
    """A 30-step run that nothing interrupts, saved every 5 steps."""
    run_dir = tmp_path_factory.mktemp("unbroken")
    proc = run(command(synthetic, run_dir, *STEPS))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir


# How each stop arrives: through our launcher, to every process of its group as Slurm delivers
# it (the checkpoint writer's helpers included) or to the launcher alone; or as Ctrl-C to a
# plain process. The first two come after a periodic save (megatron's writer kept a helper
# process from its first save on, which such a signal killed: the next save broke).
STOPS = {"usr1-to-every-process-after-a-save": (signal.SIGUSR1, True, "saved "),
         "term-to-the-launcher-after-a-save": (signal.SIGTERM, False, "saved "),
         "ctrl-c-before-any-save": (signal.SIGINT, None, "step 3/")}


@pytest.mark.parametrize("stop", STOPS)
def test_a_stop_signal_saves_once_and_the_resumed_run_ends_bit_identical(
        synthetic, unbroken, tmp_path, stop):
    signum, to_group, after = STOPS[stop]
    broken = tmp_path / "broken"
    args = command(synthetic, broken, *STEPS)
    proc = subprocess.Popen(args if to_group is None else LAUNCH + args[1:], cwd=REPO,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    for line in proc.stdout:
        if line.startswith(after):
            os.killpg(proc.pid, signum) if to_group else proc.send_signal(signum)
            break
    output = proc.stdout.read()
    assert proc.wait(timeout=300) == 0, output[-3000:]
    name = signal.Signals(signum).name
    assert output.count(f"{name} received: saved step") == 1, output[-3000:]
    stopped = find_latest_checkpoint(broken / "checkpoints")
    stopped_at = json.loads((stopped / "train_state.json").read_text())["step"]
    assert 3 <= stopped_at < 30
    resumed = run(command(synthetic, broken, *STEPS))
    assert resumed.returncode == 0 and f"resumed from {stopped}" in resumed.stdout
    expected, got = losses(unbroken), losses(broken)
    for step in range(stopped_at + 1, 31):
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step
    final = "checkpoints/iter_0000030"
    assert_identical(checkpoint_contents(unbroken / final), checkpoint_contents(broken / final))
    assert not list((broken / "checkpoints").glob("*.partial*"))


def test_sigterm_to_the_launcher_waits_for_a_save_slower_than_30s(synthetic, tmp_path):
    """torchrun alone kills its workers about 30 s after a SIGTERM; through our launcher the
    signal reaches the trainer, which finishes its step and saves (here in 35 s), and the job
    exits 0 with the checkpoint complete."""
    launcher = [sys.executable, "-m", "megatron_dvpo.launch", "--standalone",
                "--nproc-per-node", "1", str(REPO / "tests/distributed/slow_save.py")]
    args = command(synthetic, tmp_path, "train_steps=200", "checkpoint.save_interval=0")[3:]
    proc = subprocess.Popen(launcher + args, cwd=REPO, env={**env(), "SLOW_SAVE_S": "35"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("step 3/"):
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            break
    output = proc.stdout.read()
    assert proc.wait(timeout=300) == 0, output[-3000:]
    assert time.monotonic() - signalled > 35
    assert "saving slowly" in output and "SIGTERM received: saved step" in output, output[-3000:]
    latest = find_latest_checkpoint(tmp_path / "checkpoints")
    assert latest is not None and 3 <= json.loads((latest / "train_state.json").read_text())[
        "step"] < 200


def test_kill_9_during_a_save_leaves_a_loadable_checkpoint(synthetic, tmp_path):
    """Killed mid-save: the next run takes over the dead run's lock, removes its partial save
    and resumes from the newest complete checkpoint."""
    args = command(synthetic, tmp_path, "train_steps=400", "checkpoint.save_interval=1",
                   "checkpoint.keep_last=3")
    proc = subprocess.Popen(args, cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline:  # kill while a save is being written, after two finished
        partial = list(checkpoints.glob("*.partial*")) if checkpoints.is_dir() else []
        if partial and len(list(checkpoints.glob("iter_???????"))) >= 2:
            proc.kill()
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    latest = find_latest_checkpoint(checkpoints)
    assert latest is not None and (latest / "train_state.json").is_file()
    step = json.loads((latest / "train_state.json").read_text())["step"]
    resumed = run(command(synthetic, tmp_path, f"train_steps={step + 3}",
                          "checkpoint.save_interval=1", "checkpoint.keep_last=3",
                          "checkpoint.override_scheduler=true"))  # a shorter schedule now
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {latest}" in resumed.stdout
    assert "left by an interrupted save" in resumed.stdout  # the dead run's partial save
    assert not list(checkpoints.glob("*.partial*")) and not (checkpoints / ".lock").exists()
    assert find_latest_checkpoint(checkpoints).name == f"iter_{step + 3:07d}"
    # keep_last=3: the older checkpoints were pruned
    assert [p.name for p in complete_checkpoints(checkpoints)] == [
        f"iter_{s:07d}" for s in range(step + 1, step + 4)]


def nan_job(tmp_path, bad_updates, max_bad_steps, updates_per_step=1):
    """A real training job on a tiny policy whose loss is NaN at chosen updates, and its
    loop (8 steps, nothing saved)."""
    from megatron_dvpo.training.loop import TrainingLoop

    job = ScaledLossJob(tmp_path, {u: float("nan") for u in bad_updates}, updates_per_step,
                        max_bad_steps=max_bad_steps, train_steps=8,
                        **{"checkpoint.save_dir": "null"})
    return job, TrainingLoop(job.cfg, job, job.units)


def test_nan_steps_are_skipped_and_counted(tmp_path, single_rank):
    import torch

    trainee, loop = nan_job(tmp_path, bad_updates={3, 4}, max_bad_steps=3)

    def params():
        return [p.detach().clone() for p in trainee.model.chunks[0].parameters()]

    loop.run()
    assert loop.health.skipped_steps == 2 and loop.step == 8
    logged = scalars(tmp_path / "tensorboard")["train/skipped_steps"]
    assert dict(logged)[8] == 2.0
    # a bad step leaves the weights untouched
    trainee, loop = nan_job(tmp_path / "again", bad_updates={1}, max_bad_steps=3)
    before = params()
    result = trainee.step(0)
    assert result.updates[0].skipped_for == "a NaN/Inf loss or gradient"
    assert all(torch.equal(a, b) for a, b in zip(before, params()))


def test_a_nan_update_skips_only_itself(tmp_path, single_rank):
    """Four updates a step, the second of step 1 NaN: that update is skipped, the other three
    are applied (the weights equal a run that never had the second update), the step is not a
    skipped step, and grad_norm-style means never see a NaN."""
    import torch

    trainee, loop = nan_job(tmp_path, bad_updates={2}, max_bad_steps=3,
                            updates_per_step=4)
    result = trainee.step(0)
    assert [u.applied for u in result.updates] == [True, False, True, True]
    assert [u.grad_norm is not None for u in result.updates] == [True, False, True, True]
    loop.health.account(1, result.updates, result.metrics, 1.0)
    assert (loop.health.skipped_updates, loop.health.skipped_steps) == (1, 0)
    # the same three updates without the bad one: equal weights
    clean, _ = nan_job(tmp_path / "clean", bad_updates=set(), max_bad_steps=3,
                       updates_per_step=3)
    clean.updates = 0
    from megatron_dvpo.models import forward

    for seed in (1, 3, 4):
        tokens = torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(seed))
        clean.model.update(forward.make_microbatches(2, tokens=tokens),
                           forward.policy_logprobs_head(100),
                           mean_logprob_loss())
    for a, b in zip(trainee.model.chunks[0].parameters(), clean.model.chunks[0].parameters()):
        assert torch.equal(a, b)
    # a step whose every update is NaN is a skipped step
    bad, loop = nan_job(tmp_path / "bad", bad_updates={1, 2}, max_bad_steps=3,
                        updates_per_step=2)
    result = bad.step(0)
    loop.health.account(1, result.updates, result.metrics, 1.0)
    assert (loop.health.skipped_updates, loop.health.skipped_steps) == (2, 1)


def test_consecutive_nan_steps_stop_with_a_report(tmp_path, single_rank):
    from megatron_dvpo.training.health import NonFiniteError

    _, loop = nan_job(tmp_path, bad_updates=set(range(1, 9)), max_bad_steps=3)
    with pytest.raises(NonFiniteError, match=r"stopping at step 3: 3 consecutive bad steps, the "
                                             r"last with 1 of 1 updates skipped for a NaN/Inf "
                                             r"loss or gradient \(max_bad_steps=3\)"):
        loop.run()
