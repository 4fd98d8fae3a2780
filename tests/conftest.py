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


def tiny_policy_and_gvm(work: Path, train_rows: int = 8000, eval_rows: int = 400,
                        shape: tuple[str, ...] = ()) -> Path:
    """Synthetic data in ``work/synthetic``, a tiny random policy (``work/policy``; ``shape``:
    tools/build_tiny_hf.py arguments) and a zero-head GVM from it (``work/gvm``), made with the
    user-facing tools."""
    from megatron_dvpo.data import synthetic

    synthetic.main([str(work / "synthetic"), "--train-rows", str(train_rows),
                    "--eval-rows", str(eval_rows)])
    return tiny_models(work, work / "synthetic" / "tokenizer.model", shape)


def tiny_models(work: Path, tokenizer: Path, shape: tuple[str, ...] = ()) -> Path:
    """A tiny random HF Llama around ``tokenizer`` (``work/hf``), imported as a policy
    (``work/policy``) and as a zero-head GVM (``work/gvm``)."""
    for args in (["tools/build_tiny_hf.py", "--tokenizer", str(tokenizer), "--out",
                  f"{work}/hf", *shape],
                 ["tools/convert_hf_to_megatron.py", "--hf", f"{work}/hf", "--out",
                  f"{work}/policy"],
                 ["tools/convert_hf_to_megatron.py", "--hf", f"{work}/hf", "--out",
                  f"{work}/gvm", "--target", "gvm"]):
        subprocess.run([sys.executable, *args], cwd=REPO, check=True, capture_output=True)
    return work
