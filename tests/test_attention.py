"""Our SDPA core attention masks correctly for full sequences, padding and KV-cache decoding."""

import types

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_dvpo.models.attention import SDPACoreAttention, allowed_positions


def test_causal_mask_full_sequence():
    allowed = allowed_positions(4, 4, causal=True, attention_mask=None, device="cpu")
    assert torch.equal(allowed, torch.ones(4, 4, dtype=torch.bool).tril())


def test_causal_mask_is_bottom_right_aligned_for_kv_cache():
    # 2 new queries at positions 3 and 4 of 5 keys
    allowed = allowed_positions(2, 5, causal=True, attention_mask=None, device="cpu")
    assert allowed.tolist() == [[True, True, True, True, False], [True] * 5]
    # a single decoding query sees every cached key
    assert allowed_positions(1, 5, causal=True, attention_mask=None, device="cpu") is None


def test_padding_mask_and_fully_masked_rows():
    pad = torch.tensor([True, True, False, False])  # left padding, True = masked
    mask = pad.view(1, 1, 1, 4).expand(1, 1, 4, 4)
    allowed = allowed_positions(4, 4, causal=True, attention_mask=mask, device="cpu")[0, 0]
    assert allowed[2].tolist() == [False, False, True, False]
    assert allowed[3].tolist() == [False, False, True, True]
    # rows with nothing to attend to attend everywhere (finite output instead of NaN)
    assert allowed[0].all() and allowed[1].all()


def reference_attention(q, k, v, allowed, scale):
    """Naive attention: [s, b, heads, d] inputs, explicit GQA repeat and softmax."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) * scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.einsum("bhqk,kbhd->qbhd", scores.softmax(-1), v)
    return out.reshape(q.shape[0], q.shape[1], -1)


def make_attention():
    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                               num_query_groups=2, use_cpu_initialization=True)
    one_rank = types.SimpleNamespace(tp=types.SimpleNamespace(size=lambda: 1))
    return SDPACoreAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                             attention_type="self", pg_collection=one_rank)


@pytest.mark.parametrize("sq, sk", [(6, 6), (1, 6), (3, 6)])
def test_sdpa_matches_reference(sq, sk):
    attn = make_attention().eval()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(sq, 2, 4, 8, generator=g)
    k, v = torch.randn(2, sk, 2, 2, 8, generator=g)
    pad = torch.zeros(2, 1, sq, sk, dtype=torch.bool)
    pad[1, ..., :2] = True  # second row is left-padded by two keys
    out = attn(q, k, v, pad)
    allowed = allowed_positions(sq, sk, True, pad, "cpu")
    expected = reference_attention(q, k, v, allowed, 8 ** -0.5)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_kv_cache_decoding_matches_full_forward(single_rank):
    """Prefill, then 1-token steps, then a 3-token chunk: logits equal a full forward pass."""
    from megatron.core.inference.contexts import StaticInferenceContext

    from megatron_dvpo.config import load_config
    from megatron_dvpo.models.gpt import build_gpt_model

    cfg = load_config(None, ["model.num_layers=2", "model.num_query_groups=2",
                             "model.vocab_size=100"])
    model = build_gpt_model(cfg).eval()
    tokens = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(10).expand(2, 10)
    with torch.no_grad():
        full = model(tokens, positions, None)
        context = StaticInferenceContext(max_batch_size=2, max_sequence_length=16)
        context.materialize_only_last_token_logits = False
        pieces = []
        for start, end in ((0, 5), (5, 6), (6, 7), (7, 10)):
            pieces.append(model(tokens[:, start:end], positions[:, start:end], None,
                                inference_context=context, runtime_gather_output=True))
            context.sequence_len_offset += end - start
    cached = torch.cat(pieces, dim=1)
    assert cached.shape == full.shape
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
