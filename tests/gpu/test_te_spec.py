"""GPU-only checks: the Transformer Engine spec matches the local spec, and a training step runs.

Skipped, with the reason, on machines without CUDA or without transformer_engine (CI is CPU-only).
Run on a GPU node with `make test-gpu`.
"""

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                       reason="needs transformer_engine (NGC PyTorch container or the gpu extra)"),
]

MODEL = ["model.num_layers=4", "model.hidden_size=256", "model.num_attention_heads=8",
         "model.num_query_groups=2", "model.ffn_hidden_size=704", "model.vocab_size=1000",
         "precision.params_dtype=bf16"]


def test_te_spec_matches_local_spec(single_rank, tmp_path):
    from megatron.core.extensions.transformer_engine import TELayerNormColumnParallelLinear

    from megatron_dvpo.models.attention import SDPACoreAttention

    from megatron_dvpo.checkpointing import load_model, save_model
    from megatron_dvpo.config import load_config
    from megatron_dvpo.models import forward
    from megatron_dvpo.models.gpt import build_model_chunks

    local = build_model_chunks(load_config(None, MODEL + ["precision.transformer_impl=local"]))
    te = build_model_chunks(load_config(None, MODEL))  # auto: TE on a GPU with TE
    attention = te[0].decoder.layers[0].self_attention
    assert isinstance(attention.linear_qkv, TELayerNormColumnParallelLinear)  # FP8-capable GEMMs
    assert isinstance(attention.core_attention, SDPACoreAttention)  # honours padding masks
    save_model(local, tmp_path / "local")
    load_model(te, tmp_path / "local")  # the local spec's keys map onto TE's fused-norm keys
    tokens = torch.randint(0, 1000, (4, 64), device="cuda")
    batches = forward.make_microbatches(2, tokens=tokens)
    got = forward.token_logprobs(te, batches, 1000)
    expected = forward.token_logprobs(local, batches, 1000)
    diff = (got - expected).abs().max().item()
    print(f"TE vs local spec, bf16: max |d logprob| = {diff:.4g}")
    assert diff < 0.05  # bf16 tolerance on log-probs of magnitude ~7


def test_tp1_training_step_on_one_gpu(single_rank):
    from megatron_dvpo.config import load_config
    from megatron_dvpo.models import forward
    from megatron_dvpo.models.gpt import build_model_chunks
    from megatron_dvpo.training.trained_model import build_optimizer, wrap_ddp

    cfg = load_config(None, MODEL + ["optimizer.lr=1e-3"])
    chunks = build_model_chunks(cfg)
    ddp = wrap_ddp(chunks, cfg.parallel)
    optimizer = build_optimizer(ddp, cfg.optimizer, cfg.parallel, cfg.precision)
    tokens = torch.randint(0, 1000, (4, 64), device="cuda")
    batches = forward.make_microbatches(2, tokens=tokens)

    def nll(outputs, batch):
        return -outputs["logprobs"].mean(), {}

    losses = []
    for _ in range(5):
        for chunk in ddp:
            chunk.train()
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        out = forward.run_microbatches(ddp, batches, forward.policy_logprobs_head(1000), nll)
        success, grad_norm, _ = optimizer.step()
        assert success and grad_norm > 0
        losses.append(sum(o["loss"].item() for o in out))
    print("TP=1 bf16 losses on one GPU:", [round(x, 4) for x in losses])
    assert losses[-1] < losses[0]  # memorising one batch
