"""Measured model-state bytes: an fp32 model trained by Adam holds 4 bytes of weights, 4 of
gradient buffer and 8 of Adam moments per parameter; a frozen model its weights only."""

import torch

from distributed.losses import mean_logprob_loss

from megatron_dvpo.config import load_config


def test_trained_and_frozen_bytes(single_rank):
    from megatron_dvpo.model_state import GIB, model_state_metrics, trained_bytes
    from megatron_dvpo.models import forward
    from megatron_dvpo.models.gpt import build_model_chunks
    from megatron_dvpo.training.trained_model import TrainedModel

    cfg = load_config(None, ["model.num_layers=2", "model.vocab_size=100"])
    model = TrainedModel(build_model_chunks(cfg), cfg.optimizer, cfg.parallel, cfg.precision, 4)
    n = sum(p.numel() for p in model.chunks[0].parameters())
    tokens = torch.randint(0, 100, (2, 8))
    model.update(forward.make_microbatches(2, tokens=tokens), forward.policy_logprobs_head(100),
                 mean_logprob_loss())
    got = trained_bytes(model)
    assert got["params"] == 4 * n
    assert 4 * n <= got["grads"] <= 4 * n * 1.01  # megatron pads its buffers a little
    # Adam's two moments and a step count per tensor; fp32 weights need no main copy
    tensors = len(list(model.chunks[0].parameters()))
    assert 8 * n < got["optimizer"] <= 8 * n + 8 * tensors
    frozen = build_model_chunks(cfg)
    metrics = model_state_metrics({"model": model}, {"reference": frozen})
    assert metrics["memory/reference_gib"] * GIB == 4 * n
    assert metrics["memory/model_state_gib"] == sum(
        v for k, v in metrics.items() if k != "memory/model_state_gib")


class StoragelessWrapper(torch.Tensor):
    """A tensor subclass that owns no storage and keeps its data in ``_data``, as Transformer
    Engine's FP8 parameters do (a nominal bf16 tensor over one byte per element)."""

    @staticmethod
    def __new__(cls, data: torch.Tensor):
        wrapper = torch.Tensor._make_wrapper_subclass(cls, data.shape, dtype=torch.bfloat16)
        wrapper._data = data
        return wrapper

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(func)


def test_storageless_fp8_style_tensors_count_their_inner_data():
    """Two same-size FP8-style parameters: 12 bytes each of uint8 data, counted once each (not
    an error for lacking storage, not one collapsed entry, not 2 nominal bf16 bytes each)."""
    from megatron_dvpo.model_state import tensor_bytes

    first = StoragelessWrapper(torch.zeros(3, 4, dtype=torch.uint8))
    second = StoragelessWrapper(torch.ones(3, 4, dtype=torch.uint8))
    assert tensor_bytes([first, second]) == 24
    assert tensor_bytes([first, first, torch.zeros(2)]) == 12 + 8
