"""Faults around the training loop, each ending in a correct recovery or one clear line before
work is lost: damaged checkpoints, bad streaks and divergence, two runs on one save directory,
an unwritable save directory, a resume that does not fit, runtime failures and their exit
statuses. Most runs go through the trainers' ``main`` in this process (a launch would add 3 s
each and test nothing more here)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, ScaledLossJob
from megatron_dvpo.checkpointing import complete_checkpoints, find_latest_checkpoint
from megatron_dvpo.integrity import CHECKSUMS, write_checksums


def gvm(data: Path, run: Path, *overrides: str) -> list[str]:
    return ["--config", str(REPO / "examples/gvm_tiny.yaml"), f"data.train_path={data}/train.jsonl",
            f"data.tokenizer={data}/tokenizer.model", "data.eval_path=null",
            f"logging.run_dir={run}", f"checkpoint.save_dir={run}/checkpoints",
            "logging.log_interval=1", "gvm.eval_interval=0", "data.global_batch_size=16",
            "data.micro_batch_size=8", *overrides]


@pytest.fixture
def trainer_main(capsys):
    """Run a trainer's ``main`` here: (exit status, stdout + stderr). The stop signals' handlers
    are put back afterwards (a finished run leaves them ignored until its process ends)."""
    from megatron_dvpo import cpu_compat

    def call(module: str, argv: list[str]) -> tuple[int, str]:
        import importlib

        previous = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM,
                                                      signal.SIGINT)}
        capsys.readouterr()
        try:
            importlib.import_module(module).main(argv)
            status = 0
        except SystemExit as stop:
            status = stop.code
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        out = capsys.readouterr()
        return status, out.out + out.err

    yield call
    cpu_compat.uninstall()


def errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def saved_run(models, tmp_path_factory):
    """A 6-step GVM run saved at steps 2, 4 and 6."""
    run = tmp_path_factory.mktemp("saved")
    subprocess.run([sys.executable, "-m", "megatron_dvpo.gvm.train",
                    *gvm(models.data, run, "train_steps=6", "checkpoint.save_interval=2",
                         "checkpoint.keep_last=3")],
                   cwd=REPO, check=True, capture_output=True,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))
    return run


def damage(shard: Path, how: str) -> None:
    data = bytearray(shard.read_bytes())
    if how == "truncated":
        shard.write_bytes(data[:len(data) // 2])
        return
    block = os.urandom(4096) if how == "random" else bytes(4096)
    data[1024:1024 + 4096] = block
    shard.write_bytes(data)


@pytest.mark.parametrize("how", ["random", "zeros", "truncated"])
def test_a_damaged_checkpoint_is_named_and_the_newest_intact_one_resumed(
        models, saved_run, trainer_main, tmp_path, how):
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    shard = sorted((run / "checkpoints/iter_0000006/model").glob("*.distcp"))[0]
    damage(shard, how)
    status, output = trainer_main("megatron_dvpo.gvm.train",
                                  gvm(models.data, run, "train_steps=8",
                                      "checkpoint.save_interval=2", "checkpoint.keep_last=3",
                                      "checkpoint.strict_resume=true"))
    assert status == 2 and len(errors(output)) == 1, output[-2000:]
    assert str(shard) in errors(output)[0] and "no older one is tried" in errors(output)[0]
    status, output = trainer_main("megatron_dvpo.gvm.train",
                                  gvm(models.data, run, "train_steps=8",
                                      "checkpoint.save_interval=2", "checkpoint.keep_last=3"))
    assert status == 0, output[-3000:]
    warning = [line for line in output.splitlines() if line.startswith("warning: checkpoint")]
    assert len(warning) == 1 and str(shard) in warning[0], output[-3000:]
    assert f"resumed from {run}/checkpoints/iter_0000004 at step 4" in output
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == [
        "iter_0000004", "iter_0000006", "iter_0000008"]  # the damaged 6 saved again, intact


def test_a_checkpoint_from_another_rank_count_says_its_random_stream_restarts(
        models, saved_run, trainer_main, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    latest = run / "checkpoints/iter_0000006"
    state = json.loads((latest / "train_state.json").read_text())
    (latest / "train_state.json").write_text(json.dumps({**state, "world_size": 2}))
    (latest / CHECKSUMS).unlink()
    write_checksums(latest)  # as if two ranks had saved it
    status, output = trainer_main("megatron_dvpo.gvm.train",
                                  gvm(models.data, run, "train_steps=7",
                                      "checkpoint.save_interval=2", "checkpoint.keep_last=3"))
    assert status == 0, output[-2000:]
    assert "iter_0000006 was saved by 2 ranks and this run has 1: each rank's random state " \
           "starts again from the seed" in output


def test_two_runs_on_one_save_dir(models, trainer_main, tmp_path):
    """The second run refuses in one line naming the first; once the first is gone (killed:
    its lock stays behind) the lock is taken over."""
    args = gvm(models.data, tmp_path, "train_steps=500", "checkpoint.save_interval=0")
    first = subprocess.Popen([sys.executable, "-m", "megatron_dvpo.gvm.train", *args], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    for line in first.stdout:
        if line.startswith("step 2/"):
            break
    status, output = trainer_main("megatron_dvpo.gvm.train", args)
    assert status == 2 and len(errors(output)) == 1, output[-2000:]
    assert f"checkpoint.save_dir={tmp_path}/checkpoints is in use by pid {first.pid} on host" \
           in errors(output)[0]
    first.kill()
    first.wait(timeout=60)
    assert (tmp_path / "checkpoints" / ".lock").is_file()
    status, output = trainer_main("megatron_dvpo.gvm.train",
                                  gvm(models.data, tmp_path, "train_steps=2"))
    assert status == 0, output[-2000:]
    assert not (tmp_path / "checkpoints" / ".lock").exists()  # released at the end


def test_an_unwritable_save_dir_fails_before_any_work(models, trainer_main, tmp_path):
    (tmp_path / "checkpoints").write_text("a file where the save directory should be")
    status, output = trainer_main("megatron_dvpo.gvm.train",
                                  gvm(models.data, tmp_path, "train_steps=2"))
    assert status == 2 and len(errors(output)) == 1, output[-2000:]
    assert f"checkpoint.save_dir={tmp_path}/checkpoints is not writable" in errors(output)[0]
    assert not (tmp_path / "tensorboard").exists()


def test_resuming_another_model_shape_fails_before_any_work(models, saved_run, trainer_main,
                                                           tmp_path):
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    status, output = trainer_main("megatron_dvpo.gvm.train",
                                  gvm(models.data, run, "train_steps=8",
                                      "model.hidden_size=32"))
    assert status == 2 and len(errors(output)) == 1, output[-2000:]
    assert (f"cannot resume from {run}/checkpoints/iter_0000006: its model has other shapes "
            "(model.hidden_size: 32 here, 64 there)") in errors(output)[0]
    assert "Traceback" not in output


@pytest.mark.multirank
def test_the_launcher_exits_with_the_workers_status(models, tmp_path):
    """Bad input: 2 from every worker, so 2 from the launcher too (torchrun alone says 1)."""
    proc = subprocess.run([sys.executable, "-m", "megatron_dvpo.launch", "--standalone",
                           "--nproc-per-node", "2", "-m", "megatron_dvpo.gvm.train",
                           *gvm(models.data, tmp_path, "gvm.lamda=1")],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "unknown config key 'gvm.lamda'" in proc.stderr


def test_a_runtime_failure_is_one_line_and_a_traceback_in_the_log(models, trainer_main,
                                                                 tmp_path, monkeypatch):
    from megatron_dvpo.gvm.train import GVMTrainer

    def broken(self, step):
        raise RuntimeError("the data loader lost its file system\nmore detail")

    monkeypatch.setattr(GVMTrainer, "step", broken)
    status, output = trainer_main("megatron_dvpo.gvm.train",
                                  gvm(models.data, tmp_path, "train_steps=2"))
    log = tmp_path / "logs" / "error-rank0.log"
    assert status == 1 and errors(output) == [
        "error: [rank 0] RuntimeError: the data loader lost its file system (the traceback is "
        f"in {log})"], output[-2000:]
    assert "Traceback" in log.read_text() and "Traceback" not in output


def test_dvpo_at_an_absurd_learning_rate_stops_as_diverged(task, trainer_main, tmp_path):
    """optimizer.lr=1e6: every loss and gradient stays finite while the weights blow up (the
    run used to end with exit 0, weights of 6e6 and a uniform policy)."""
    status, output = trainer_main("megatron_dvpo.rl.dvpo", [
        "--config", str(REPO / "examples/dvpo_tiny.yaml"),
        f"data.train_path={task.data}/train.jsonl", "data.eval_path=null",
        f"rl.policy={task.sft}", f"dvpo.gvm={task.gvm}", "rl.true_reward=null",
        f"logging.run_dir={tmp_path}", f"checkpoint.save_dir={tmp_path}/checkpoints",
        "train_steps=4", "checkpoint.save_interval=1", "data.global_batch_size=16",
        "data.micro_batch_size=8",
        "optimizer.lr=1e6", "optimizer.lr_decay_style=constant"])
    assert status == 4 and len(errors(output)) == 1, output[-3000:]
    assert "stopping at step 1: its updates grew the parameters' norm" in errors(output)[0]
    assert "the newest good checkpoint is none" in errors(output)[0]
    assert find_latest_checkpoint(tmp_path / "checkpoints") is None  # nothing diverged saved


SAVED_EVERY_STEP = {"checkpoint.save_interval": 1}


def test_a_bad_streak_saves_nothing_and_names_the_newest_good_checkpoint(tmp_path,
                                                                          single_rank):
    from megatron_dvpo.training.health import NonFiniteError
    from megatron_dvpo.training.loop import TrainingLoop

    job = ScaledLossJob(tmp_path, {3: float("nan"), 4: float("nan"), 5: float("nan")},
                        max_bad_steps=3, **SAVED_EVERY_STEP)
    saved = tmp_path / "checkpoints" / "iter_0000002"
    with pytest.raises(NonFiniteError, match=rf"stopping at step 5: 3 consecutive bad steps.*"
                                             rf"the newest good checkpoint is {saved}$"):
        TrainingLoop(job.cfg, job, job.units).run()
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == [
        "iter_0000001", "iter_0000002"]  # steps 3 and 4 were not saved, nothing was pruned


def test_a_gradient_norm_spike_stops_the_run(tmp_path, single_rank):
    """Step 15's loss x 1e4: finite, clipped to norm 1 by the optimizer, but its gradient norm
    is far above the median of the steps before: the run stops, step 14 the newest checkpoint."""
    from megatron_dvpo.training.health import DivergedError
    from megatron_dvpo.training.loop import TrainingLoop

    job = ScaledLossJob(tmp_path, {15: 1e4}, **SAVED_EVERY_STEP)
    saved = tmp_path / "checkpoints" / "iter_0000014"
    with pytest.raises(DivergedError, match=rf"stopping at step 15: its gradient norm .* the "
                                            rf"median .* of the previous 14 steps "
                                            rf"\(divergence_factor=10\).*{saved}$"):
        TrainingLoop(job.cfg, job, job.units).run()
    assert find_latest_checkpoint(tmp_path / "checkpoints") == saved


def test_a_gradient_norm_spike_can_be_left_to_the_clip(tmp_path, single_rank):
    """divergence_grad_spikes=false (the RL examples'): the same spike is clipped and the run
    goes on; the parameters' norm growth is still checked."""
    from megatron_dvpo.training.loop import TrainingLoop

    job = ScaledLossJob(tmp_path, {15: 1e4}, **SAVED_EVERY_STEP, divergence_grad_spikes=False)
    TrainingLoop(job.cfg, job, job.units).run()
    last = find_latest_checkpoint(tmp_path / "checkpoints")
    assert last.name == f"iter_{job.cfg.train_steps:07d}"
