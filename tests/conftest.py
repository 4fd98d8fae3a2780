"""Shared test helpers: launching real multi-rank runs with torchrun on gloo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def torchrun(args: list[str], nproc: int, timeout: int = 600, cwd: Path = REPO):
    """Run ``torchrun --nproc-per-node nproc args``; fail the test with the output on error."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--standalone", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"torchrun {' '.join(args)} failed ({proc.returncode}):\n"
                    f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


@pytest.fixture
def single_rank():
    """A real one-rank world (gloo on CPU, nccl on GPU) with megatron's parallel state."""
    from megatron_dvpo import cpu_compat, distributed
    from megatron_dvpo.config import ParallelConfig

    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        os.environ.pop(key, None)
    distributed.init_distributed(ParallelConfig(), seed=1234)
    yield
    distributed.shutdown()
    cpu_compat.uninstall()
