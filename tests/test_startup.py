"""What every process pays at start: megatron-core's import without eager compilation, and
checkpoint saves without a helper process."""

import os
import queue
import subprocess
import sys

import psutil
import torch

from conftest import REPO

PROBE = """
import sys, torch
eager = torch.compile
import megatron_dvpo.models.gpt
assert torch.compile is eager, "torch.compile is restored after megatron.core's import"
assert not any(m.startswith("torch._inductor") for m in sys.modules), "inductor was imported"
from megatron.core.fusions.fused_bias_swiglu import swiglu
x = torch.randn(3, 8)
a, b = x.chunk(2, -1)
assert torch.allclose(swiglu(x), torch.nn.functional.silu(a) * b)
print("ok")
"""


def test_megatron_imports_without_compiling_its_fusions():
    """~40 torch.compile decorations at import cost 1.1 s of each process's start; deferred,
    the decorated function still computes what it computed (torch.compile'd at its first call;
    dynamo disabled here, or inductor would spend seconds compiling C++ for one call)."""
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1")
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_a_save_leaves_no_helper_process(single_rank, tmp_path):
    """megatron's writer would start a spawned Manager process at the first save (1.4 s, and a
    process that a job's stop signal kills); the write results stay in this process."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_dvpo.checkpointing import load_model, save_model
    from megatron_dvpo.config import load_config
    from megatron_dvpo.models.gpt import build_model_chunks

    chunks = build_model_chunks(load_config(None, ["model.num_layers=1"]))
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    save_model(chunks, tmp_path / "ckpt")
    assert isinstance(filesystem_async._results_queue, queue.Queue)
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before
    loaded = build_model_chunks(load_config(None, ["model.num_layers=1"]), initialize=False)
    load_model(loaded, tmp_path / "ckpt")
    for (name, p), q in zip(chunks[0].named_parameters(), loaded[0].parameters()):
        assert torch.equal(p, q), name
