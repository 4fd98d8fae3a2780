"""The CPU accommodations are scoped to the upstream modules they name, and a no-op with CUDA."""

import importlib

import pytest
import torch

from megatron_dvpo import cpu_compat


@pytest.fixture
def installed():
    assert cpu_compat.install()
    yield
    cpu_compat.uninstall()


def test_noop_when_cuda_is_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_compat.install() is False
    assert not cpu_compat.is_installed()
    schedules = importlib.import_module("megatron.core.pipeline_parallel.schedules")
    assert schedules.torch is torch
    assert torch.Tensor.type(torch.ones(1)) == "torch.FloatTensor"


def test_redirects_only_named_modules(installed):
    schedules = importlib.import_module("megatron.core.pipeline_parallel.schedules")
    p2p = importlib.import_module("megatron.core.pipeline_parallel.p2p_communication")
    # the schedules' total_num_tokens = torch.zeros([], device="cuda")
    assert schedules.torch.zeros([], dtype=torch.int, device="cuda").device.type == "cpu"
    assert p2p.torch.empty(3, device=p2p.torch.cuda.current_device()).device.type == "cpu"
    p2p.torch.cuda.synchronize()  # no-op instead of "Torch not compiled with CUDA enabled"
    # the real torch is untouched: CUDA calls elsewhere still fail loudly
    assert torch.zeros is not schedules.torch.zeros
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")


def test_tensor_type_and_cuda(installed):
    t = torch.ones(2)
    assert t.type() == "torch.cuda.FloatTensor"  # megatron optimizers assert this string
    assert t.bfloat16().type() == "torch.cuda.BFloat16Tensor"
    assert t.type(torch.float64).dtype == torch.float64  # conversions still convert
    assert t.cuda() is t


def test_rng_tracker_forks_cpu_state(installed):
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("model-parallel-rng", 2718)
    torch.manual_seed(0)
    with tracker.fork():
        a = torch.rand(3)
    outside = torch.rand(3)
    with tracker.fork():
        b = torch.rand(3)
    torch.manual_seed(2718)
    assert torch.equal(a, torch.rand(3))  # the fork draws from its own seeded stream...
    assert not torch.equal(a, b)  # ...which advances between forks
    torch.manual_seed(0)
    assert torch.equal(outside, torch.rand(3))  # and leaves the default stream alone


def test_uninstall_restores():
    schedules = importlib.import_module("megatron.core.pipeline_parallel.schedules")
    cpu_compat.install()
    cpu_compat.uninstall()
    assert schedules.torch is torch
    assert torch.ones(1).type() == "torch.FloatTensor"
