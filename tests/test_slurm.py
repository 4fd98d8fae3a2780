"""The sbatch launchers on a real (single-node, localhost) Slurm, CPU-only, tiny configs."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

import slurm_cluster
from conftest import REPO

reason = slurm_cluster.available()
pytestmark = pytest.mark.skipif(reason is not None, reason=reason or "")
PYTHON = {"PYTHON": sys.executable, "GPUS_PER_NODE": "1", "MASTER_PORT": "29611",
          "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = slurm_cluster.LocalSlurm(tmp_path_factory.mktemp("slurm"))
    c.start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def inputs(models, tmp_path_factory):
    return models.linked(tmp_path_factory.mktemp("inputs"))


def gvm_args(inputs: Path, run: Path, steps: int) -> list[str]:
    data = inputs / "synthetic"
    return ["--config", "examples/gvm_tiny.yaml", f"data.train_path={data}/train.jsonl",
            f"data.tokenizer={data}/tokenizer.model", "data.eval_path=null",
            f"logging.run_dir={run}", f"checkpoint.save_dir={run}/checkpoints",
            f"train_steps={steps}", "gvm.eval_interval=0", "logging.log_interval=1"]


def final_step(run: Path) -> int:
    return int((run / "checkpoints" / "latest_checkpointed_iteration.txt").read_text())


def test_gvm_and_dvpo_jobs_complete(cluster, inputs, tmp_path):
    run = tmp_path / "gvm"
    job = cluster.sbatch("--output", str(tmp_path / "gvm.out"), "slurm/train_gvm.sh",
                         *gvm_args(inputs, run, 10), cwd=REPO,
                         env={**PYTHON, "RUN_DIR": str(run)})
    assert cluster.wait(job) == "COMPLETED", (tmp_path / "gvm.out").read_text()
    assert final_step(run) == 10
    logs = "".join(p.read_text() for p in (run / "logs").glob("*.log"))
    assert "step 10/10" in logs and "saved" in logs

    run = tmp_path / "dvpo"
    job = cluster.sbatch(
        "--output", str(tmp_path / "dvpo.out"), "slurm/train_dvpo.sh", "--config",
        "examples/dvpo_tiny.yaml", f"data.train_path={inputs}/synthetic/train.jsonl",
        "data.eval_path=null", f"rl.policy={inputs}/policy", f"dvpo.gvm={inputs}/gvm",
        f"logging.run_dir={run}", f"checkpoint.save_dir={run}/checkpoints", "train_steps=3",
        "data.global_batch_size=16", "data.micro_batch_size=8", cwd=REPO,
        env={**PYTHON, "RUN_DIR": str(run), "MASTER_PORT": "29612"})
    assert cluster.wait(job) == "COMPLETED", (tmp_path / "dvpo.out").read_text()
    assert final_step(run) == 3


def test_sigusr1_saves_requeues_and_resumes(cluster, inputs, tmp_path):
    run = tmp_path / "preempted"
    job = cluster.sbatch("--output", str(tmp_path / "job.out"), "slurm/train_gvm.sh",
                         *gvm_args(inputs, run, 300), cwd=REPO,
                         env={**PYTHON, "RUN_DIR": str(run), "MASTER_PORT": "29613"})
    deadline = time.time() + 300
    while time.time() < deadline:  # signal once training is under way
        logs = "".join(p.read_text() for p in (run / "logs").glob("*.log")) \
            if (run / "logs").is_dir() else ""
        if "step 5/300" in logs:
            break
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", job], env=cluster.env, check=True)
    assert cluster.wait(job, timeout=600) == "COMPLETED", (tmp_path / "job.out").read_text()
    logs = "".join(p.read_text() for p in (run / "logs").glob("*.log"))
    assert "SIGUSR1 received: saved step" in logs
    assert "resumed from" in logs
    assert final_step(run) == 300  # the same final step as an uninterrupted run
    restarts = subprocess.run(["scontrol", "show", "job", job], env=cluster.env,
                              capture_output=True, text=True).stdout
    assert "Restarts=1" in restarts
