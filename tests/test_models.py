"""Model construction: spec routing, the GVM head, Llama-3 RoPE scaling and vocab padding."""

import pytest
import torch

from megatron_dvpo.config import load_config
from megatron_dvpo.models.spec import layer_spec


def test_local_spec_uses_sdpa_attention():
    from megatron_dvpo.models.attention import SDPACoreAttention

    spec = layer_spec(load_config().model, use_te=False)
    assert spec.submodules.self_attention.submodules.core_attention is SDPACoreAttention


def tiny(*overrides):
    return load_config(None, ["model.num_layers=2", "model.vocab_size=100", *overrides])


def test_gvm_head_is_zero_initialised_fp32(single_rank):
    from megatron_dvpo.models import forward
    from megatron_dvpo.models.gvm import GlobalValueModel, ValueHead, build_gvm_chunks

    (gvm,) = build_gvm_chunks(tiny("model.tie_embeddings=true"))  # a tied policy config
    assert isinstance(gvm, GlobalValueModel) and isinstance(gvm.output_layer, ValueHead)
    head = gvm.output_layer.weight
    assert head.shape == (1, 64) and head.dtype == torch.float32
    assert not gvm.share_embeddings_and_output_weights
    tokens = torch.randint(0, 100, (2, 7))
    values = forward.token_values([gvm], forward.make_microbatches(2, tokens=tokens))
    assert values.shape == (2, 7) and values.dtype == torch.float32
    assert torch.count_nonzero(values) == 0
    with pytest.raises(ValueError, match="no language-model loss"):
        gvm(tokens, torch.arange(7).expand(2, 7), None, labels=tokens)


def test_logprobs_ignore_padded_vocab(single_rank):
    """The embedding is padded to 128 rows; padded logits get no probability mass."""
    from megatron_dvpo.models import forward
    from megatron_dvpo.models.gpt import build_gpt_model

    model = build_gpt_model(tiny()).eval()
    assert model.embedding.word_embeddings.weight.shape[0] == 128
    tokens = torch.randint(0, 100, (2, 9))
    positions = torch.arange(9).expand(2, 9)
    with torch.no_grad():
        logits = model(tokens, positions, None)
        got = forward.token_logprobs([model], forward.make_microbatches(2, tokens=tokens), 100)
    expected = torch.log_softmax(logits[..., :100], -1)[:, :-1].gather(
        -1, tokens[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    # and differs from a softmax over all 128 rows, so the masking is what makes it match
    unmasked = torch.log_softmax(logits, -1)[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)
    assert (got - unmasked).abs().max() > 1e-4


def test_llama3_rope_scaling_matches_hf(single_rank):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import _compute_llama3_parameters

    from megatron_dvpo.models.gpt import build_gpt_model

    cfg = tiny("model.rotary_base=500000", "model.rope_scaling_factor=32",
               "model.rope_scaling_high_freq_factor=4", "model.rope_scaling_low_freq_factor=1",
               "model.rope_scaling_original_max_position=64", "model.hidden_size=256",
               "model.num_attention_heads=2")
    model = build_gpt_model(cfg)
    hf = LlamaConfig(hidden_size=256, num_attention_heads=2, max_position_embeddings=512,
                     rope_theta=500000.0,
                     rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64})
    expected, _ = _compute_llama3_parameters(hf, "cpu")
    torch.testing.assert_close(model.rotary_pos_emb.inv_freq, expected, atol=0, rtol=1e-6)
    unscaled = build_gpt_model(tiny("model.rotary_base=500000", "model.hidden_size=256",
                                    "model.num_attention_heads=2"))
    assert not torch.allclose(unscaled.rotary_pos_emb.inv_freq, expected)


def test_qwen2_qkv_bias(single_rank):
    from megatron_dvpo.models.gpt import build_gpt_model

    model = build_gpt_model(tiny("model.add_qkv_bias=true"))
    names = {n for n, _ in model.named_parameters()}
    assert "decoder.layers.0.self_attention.linear_qkv.bias" in names
    assert "decoder.layers.0.self_attention.linear_proj.bias" not in names


def test_training_flops_of_llama_3_2_1b():
    """6·N + 12·L·s·d_attn with N = the matrix parameters: Llama-3.2-1B's 1,235,814,400
    parameters less its 67,584 norm weights."""
    from megatron_dvpo.models.gpt import training_flops_per_token

    model = load_config("examples/llama3.2_1b.yaml").model
    matmul_params = 1_235_814_400 - 67_584
    assert training_flops_per_token(model, 2048) == 6 * matmul_params + 12 * 16 * 2048 * 2048


def test_training_flops_count_every_matrix_of_a_built_model(single_rank):
    from megatron_dvpo.models.gpt import (build_model_chunks, count_parameters,
                                          training_flops_per_token)

    cfg = tiny("model.num_query_groups=2", "model.ffn_hidden_size=96")
    chunks = build_model_chunks(cfg)
    _, total = count_parameters(chunks)
    norms = sum(p.numel() for n, p in chunks[0].named_parameters() if "norm" in n)
    embedding = cfg.model.padded_vocab_size * cfg.model.hidden_size  # a lookup, no matmul
    attention = 12 * cfg.model.num_layers * 10 * cfg.model.hidden_size
    assert (training_flops_per_token(cfg.model, 10) - attention) / 6 == total - norms - embedding


def test_training_flops_of_a_value_model_count_its_one_column_head(single_rank):
    from megatron_dvpo.models.gpt import count_parameters, training_flops_per_token
    from megatron_dvpo.models.gvm import build_gvm_chunks, gvm_config

    cfg = gvm_config(tiny("model.num_query_groups=2", "model.ffn_hidden_size=96"))
    chunks = build_gvm_chunks(cfg)
    _, total = count_parameters(chunks)
    no_matmul = sum(p.numel() for n, p in chunks[0].named_parameters()
                    if "norm" in n or "embedding" in n or n.endswith("bias"))
    attention = 12 * cfg.model.num_layers * 10 * cfg.model.hidden_size
    assert (training_flops_per_token(cfg.model, 10) - attention) / 6 == total - no_matmul


def test_training_flops_of_a_mixture_of_experts_count_its_active_parameters(single_rank):
    """With every expert chosen (top-k = experts) each built matrix multiplies; with top-1 of
    the same experts, one expert's share; Qwen3-30B-A3B's active parameters are its 3.3B."""
    from megatron_dvpo.models.gpt import (build_model_chunks, count_parameters,
                                          training_flops_per_token)

    moe = ("model.num_experts=2", "model.moe_ffn_hidden_size=32",
           "model.moe_shared_expert_intermediate_size=48", "model.moe_shared_expert_gate=true")
    cfg = tiny("model.num_query_groups=2", "model.moe_router_topk=2", *moe)
    chunks = build_model_chunks(cfg)
    _, total = count_parameters(chunks)
    no_matmul = sum(p.numel() for n, p in chunks[0].named_parameters()
                    if "norm" in n or "embedding" in n)
    attention = 12 * cfg.model.num_layers * 10 * cfg.model.hidden_size
    all_active = (training_flops_per_token(cfg.model, 10) - attention) / 6
    assert all_active == total - no_matmul
    top1 = tiny("model.num_query_groups=2", "model.moe_router_topk=1", *moe).model
    one_expert = cfg.model.num_layers * 3 * cfg.model.hidden_size * 32
    assert all_active - (training_flops_per_token(top1, 10) - attention) / 6 == one_expert
    qwen3 = load_config("examples/qwen3_30b_a3b.yaml").model
    active = (training_flops_per_token(qwen3, 1) - 12 * 48 * 32 * 128) / 6
    assert 3.2e9 < active + qwen3.vocab_size * qwen3.hidden_size < 3.4e9  # + the embedding
