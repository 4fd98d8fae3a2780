"""The sbatch launchers on a real Slurm cluster of two nodes on this host (CPU-only, tiny
configs): preemption after a periodic save, by SIGUSR1 and by ``scontrol requeue``, on two
nodes, ends with a restart and a final checkpoint bit-identical to an uninterrupted run's; a
SIGUSR1 to the batch shell alone is passed on; two jobs run side by side on one node."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

import slurm_cluster
from conftest import REPO, assert_identical, checkpoint_contents

reason = slurm_cluster.available()
pytestmark = pytest.mark.skipif(reason is not None, reason=reason or "")
ENV = {"PYTHON": sys.executable, "GPUS_PER_NODE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONWARNINGS": "ignore"}
STEPS = 20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = slurm_cluster.LocalSlurm(tmp_path_factory.mktemp("slurm"), nodes=2)
    c.start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def inputs(models, tmp_path_factory):
    return models.linked(tmp_path_factory.mktemp("inputs"))


def gvm_args(inputs: Path, run: Path, steps: int = STEPS) -> list[str]:
    data = inputs / "synthetic"
    return ["--config", "examples/gvm_tiny.yaml", f"data.train_path={data}/train.jsonl",
            f"data.tokenizer={data}/tokenizer.model", "data.eval_path=null",
            f"logging.run_dir={run}", f"checkpoint.save_dir={run}/checkpoints",
            f"train_steps={steps}", "gvm.eval_interval=0", "logging.log_interval=1",
            "checkpoint.save_interval=5", "data.global_batch_size=16",
            "data.micro_batch_size=8"]


def submit(cluster, run: Path, script: str, args: list[str], *sbatch: str) -> str:
    return cluster.sbatch("--output", str(run.parent / f"{run.name}.out"), *sbatch, script,
                          *args, cwd=REPO, env={**ENV, "RUN_DIR": str(run)})


def logs(run: Path) -> str:
    return "".join(p.read_text() for p in sorted((run / "logs").glob("*.log"))) \
        if (run / "logs").is_dir() else ""


def wait_through_requeue(cluster, job: str, timeout: float = 300) -> str:
    """The job's final state, releasing it from Slurm's hold each time it is requeued."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = cluster.job_state(job)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            return state
        if state == "PENDING" and cluster.restarts(job) > 0:
            cluster.release_requeued(job)
        time.sleep(0.5)
    raise TimeoutError(f"job {job} still {cluster.job_state(job)} after {timeout}s")


def final_checkpoint(run: Path) -> Path:
    return run / "checkpoints" / f"iter_{STEPS:07d}"


@pytest.fixture(scope="module")
def unbroken(cluster, inputs, tmp_path_factory):
    """A GVM job on two nodes, one rank each (DP=2), nothing interrupting it; beside it, a GVM
    job and a DVPO job of one node each: three jobs on one host, their rendezvous ports apart."""
    root = tmp_path_factory.mktemp("unbroken")
    dvpo = ["--config", "examples/dvpo_tiny.yaml",
            f"data.train_path={inputs}/synthetic/train.jsonl", "data.eval_path=null",
            f"rl.policy={inputs}/policy", f"dvpo.gvm={inputs}/gvm",
            f"logging.run_dir={root}/dvpo", f"checkpoint.save_dir={root}/dvpo/checkpoints",
            "train_steps=3", "data.global_batch_size=16", "data.micro_batch_size=8"]
    jobs = {"two_nodes": submit(cluster, root / "two_nodes", "slurm/train_gvm.sh",
                                gvm_args(inputs, root / "two_nodes"), "--nodes=2"),
            "one_node": submit(cluster, root / "one_node", "slurm/train_gvm.sh",
                               gvm_args(inputs, root / "one_node", 10), "--nodes=1"),
            "dvpo": submit(cluster, root / "dvpo", "slurm/train_dvpo.sh", dvpo, "--nodes=1")}
    for name, job in jobs.items():
        assert cluster.wait(job) == "COMPLETED", (root / f"{name}.out").read_text()[-3000:]
    return root


def test_jobs_side_by_side_complete(unbroken):
    assert f"step {STEPS}/{STEPS}" in logs(unbroken / "two_nodes")
    assert sorted(p.name.rsplit("-", 1)[-1] for p in (unbroken / "two_nodes/logs").iterdir()) \
        == ["node0.log", "node1.log"]  # one torchrun per node
    assert (unbroken / "one_node/checkpoints/iter_0000010").is_dir()
    assert (unbroken / "dvpo/checkpoints/iter_0000003").is_dir()


@pytest.mark.parametrize("how", ["scancel --signal=USR1", "scontrol requeue"])
def test_preemption_after_a_periodic_save_resumes_bit_identical(cluster, inputs, unbroken,
                                                               tmp_path, how):
    """After the step-5 save: SIGUSR1 to every process of the job (Slurm's --signal warning)
    or a requeue (SIGTERM): the job saves once, requeues, restarts, resumes and completes."""
    run = tmp_path / "preempted"
    job = submit(cluster, run, "slurm/train_gvm.sh", gvm_args(inputs, run), "--nodes=2")
    deadline = time.time() + 300
    while "saved " not in logs(run) and time.time() < deadline:
        time.sleep(0.2)
    command = (["scancel", "--signal=USR1", job] if how.startswith("scancel")
               else ["scontrol", "requeue", job])
    subprocess.run(command, env=cluster.env, check=True)
    assert wait_through_requeue(cluster, job) == "COMPLETED", \
        (tmp_path / "preempted.out").read_text()[-3000:] + logs(run)[-3000:]
    output = logs(run)
    if how.startswith("scancel"):
        assert "SIGUSR1 received: saved step" in output, output[-3000:]
    assert "resumed from" in output and cluster.restarts(job) >= 1
    assert_identical(checkpoint_contents(final_checkpoint(unbroken / "two_nodes")),
                     checkpoint_contents(final_checkpoint(run)))
    assert not list((run / "checkpoints").glob("*.partial*"))


def test_sigusr1_to_the_batch_shell_is_passed_on(cluster, inputs, tmp_path):
    """``scancel --batch --signal=USR1`` (or --signal=B:USR1@T) reaches the batch shell only:
    it passes the signal on to the job step instead of dying of it."""
    run = tmp_path / "batch"
    job = submit(cluster, run, "slurm/train_gvm.sh", gvm_args(inputs, run, 200), "--nodes=1")
    deadline = time.time() + 300
    while "step 3/" not in logs(run) and time.time() < deadline:
        time.sleep(0.2)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=cluster.env, check=True)
    deadline = time.time() + 300
    while "SIGUSR1 received" not in logs(run) and time.time() < deadline:
        time.sleep(0.5)
    assert "SIGUSR1 received: saved step" in logs(run), logs(run)[-3000:]
    subprocess.run(["scancel", job], env=cluster.env, check=True)  # no need to finish 200 steps
