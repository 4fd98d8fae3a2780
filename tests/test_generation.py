"""Rollout generation: TP/PP equal TP=1, recorded log-probs equal a fresh forward pass."""

import contextlib
import json

import pytest
import torch

from conftest import REPO, launch
from megatron_dvpo.models.generation import SamplingConfig, left_pad, sample_tokens


@pytest.mark.multirank
@pytest.mark.compat
def test_rollout_tp2_pp2_equal_tp1_and_match_fresh_forward(tmp_path):
    """Also with sequence parallelism (tp2pp1sp): decoding runs it off (one token per row),
    and the fresh forward pads each sequence to a multiple of TP; and with EOS barred for the
    first tokens (rollout.min_new_tokens)."""
    out = tmp_path / "rollout.json"
    launch([str(REPO / "tests/distributed/rollout_check.py"), str(out), str(tmp_path),
            "tp2pp1", "tp1pp2", "tp2pp1sp"], nproc=2)
    result = json.loads(out.read_text())
    assert result["tp1pp1"]["response_lengths"][0] < 12  # a row stopped at EOS
    for layout in ("tp2pp1", "tp1pp2", "tp2pp1sp"):
        assert result[layout]["greedy_tokens_equal"], result
        assert 0 <= result[layout]["greedy_logprob_max_diff"] <= 1e-5
        assert result[layout]["sequence_parallel_flags_restored"], layout
    for layout in ("tp1pp1", "tp2pp1", "tp1pp2", "tp2pp1sp"):
        assert 0 <= result[layout]["fresh_forward_max_diff"] <= 1e-4, result
        assert 0 <= result[layout]["tempered_fresh_forward_max_diff"] <= 1e-4, result
        assert result[layout]["untempered_gap"] > 0.05, result  # temperature 1 differs
        # rollout.min_new_tokens: no response ends before it, log-probs still the policy's
        least = result[layout]["min_new_tokens"]
        assert min(result[layout]["min_new_tokens_lengths"]) > least, result[layout]
        assert 0 <= result[layout]["min_new_tokens_fresh_forward_max_diff"] <= 1e-4, result


def test_policy_head_scores_the_tempered_distribution(single_rank):
    """Log-probs and entropy of softmax(logits / T), padded vocabulary columns excluded."""
    from megatron_dvpo.models import forward

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 128, generator=g) * 4
    tokens = torch.randint(0, 100, (2, 6), generator=g)
    out = forward.policy_logprobs_head(100, temperature=0.7, entropy=True)(
        logits, {"tokens": tokens})
    expected = (logits[:, :-1, :100] / 0.7).log_softmax(-1)
    assert torch.allclose(out["logprobs"], expected.gather(-1, tokens[:, 1:, None])[..., 0],
                          atol=1e-5)
    assert torch.allclose(out["entropy"], -(expected.exp() * expected).sum(-1), atol=1e-5)
    assert forward.logit_temperature(0.0) == 1.0  # greedy decoding scores at temperature 1


def test_left_pad():
    tokens, pads = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert tokens.tolist() == [[5, 6, 7], [0, 0, 8]] and pads.tolist() == [0, 2]


def test_sampling_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert sample_tokens(logits, SamplingConfig(temperature=0.0), g).unique().tolist() == [0]
    top2 = sample_tokens(logits, SamplingConfig(temperature=1.0, top_k=2), g)
    assert set(top2.unique().tolist()) == {0, 1}
    # softmax([4,3,2,1,0]) = [.636, .234, .086, ...]: top_p=0.8 keeps tokens 0 and 1 only
    nucleus = sample_tokens(logits, SamplingConfig(temperature=1.0, top_p=0.8), g)
    assert set(nucleus.unique().tolist()) == {0, 1}
    share = (nucleus == 0).float().mean().item()
    assert abs(share - 0.636 / (0.636 + 0.234)) < 0.04


@pytest.mark.parametrize("temperature, entropy_grad", [(1.0, False), (0.7, True)])
def test_the_lean_head_scores_response_positions_in_chunks_like_the_full_one(
        single_rank, temperature, entropy_grad):
    """start skips the prompt's positions and chunk recomputes each chunk in the backward:
    the same log-probs, entropies and gradients as the head over every position at once."""
    from megatron_dvpo.models import forward

    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 301, 128, generator=g) * 3).requires_grad_()
    tokens = torch.randint(0, 100, (2, 301), generator=g)
    start = 40
    weights = torch.randn(2, 300, generator=g)
    weights[:, :start] = 0  # the loss reads the response part only, as RL does

    def run(head, offset):
        out = head(logits, {"tokens": tokens})
        w = weights[:, offset:]
        loss = (out["logprobs"] * w).sum() + (out["entropy"] * w).sum()
        grad, = torch.autograd.grad(loss, logits)
        return out, grad

    full, full_grad = run(forward.policy_logprobs_head(100, temperature, True, entropy_grad), 0)
    full = {k: v[:, start:] for k, v in full.items()}
    lean, lean_grad = run(forward.policy_logprobs_head(100, temperature, True, entropy_grad,
                                                       start=start, chunk=64), start)
    for key in ("logprobs", "entropy"):
        assert lean[key].shape == (2, 300 - start)
        assert torch.allclose(lean[key], full[key], atol=1e-6), key
    assert torch.allclose(lean_grad, full_grad, atol=1e-6)
    assert lean_grad[:, :start].abs().sum() == 0


def test_sampling_draws_the_tempered_distribution():
    """Shares of 40k draws at temperature 0.7 match softmax(logits / 0.7) within 1 point, and
    padded-vocabulary columns (-inf) are never drawn."""
    from megatron_dvpo.models.generation import mask_padded_vocab

    logits = mask_padded_vocab(torch.tensor([[2.0, 1.5, 0.5, -1.0, 0.0, 9.0]]), 5)
    draws = sample_tokens(logits.repeat(40000, 1), SamplingConfig(temperature=0.7),
                          torch.Generator().manual_seed(3))
    shares = torch.bincount(draws, minlength=6).float() / draws.numel()
    expected = (logits[0] / 0.7).softmax(-1)
    assert shares[5] == 0
    assert (shares - expected).abs().max() < 0.01, (shares, expected)


def test_the_cdf_inversion_never_picks_a_zero_weight_column():
    """At the ends of [0, 1): the first column of non-zero weight, and the last one, never the
    zero-weight (padded-vocabulary) columns around them."""
    from megatron_dvpo.models.generation import invert_cdf

    weights = torch.tensor([[0.0, 0.2, 0.0, 0.5, 0.3, 0.0, 0.0]], dtype=torch.float64)
    cdf = weights.cumsum(-1).repeat(4, 1)
    uniform = torch.tensor([[0.0], [0.2], [0.7], [1.0]], dtype=torch.float64)  # 1: rounding
    assert invert_cdf(cdf, uniform).tolist() == [1, 3, 4, 4]


def test_decode_splits_rows_over_the_pipeline_stages():
    """PP=2 decodes a batch of 4 in two blocks (the rollout check above runs it: tp1pp2's
    greedy tokens equal TP=1's only if each block keeps its own KV-cache rows)."""
    from megatron_dvpo.models.generation import decode_microbatches

    assert decode_microbatches(4, 2) == 2
    assert [decode_microbatches(rows, 4) for rows in (1, 6, 8, 7)] == [1, 3, 4, 1]
    assert decode_microbatches(16, 1) == 1


@pytest.mark.compat
def test_the_sampler_receives_last_position_logits_only(single_rank, monkeypatch):
    """On every supported megatron-core (0.19 trims to the last position only inside its own
    engines), the prefill gives [B, 1, V] logits, not [B, P, V]; the tokens equal those of the
    untrimmed head."""
    from megatron_dvpo.config import load_config
    from megatron_dvpo.models import generation
    from megatron_dvpo.models.gpt import build_model_chunks

    chunks = build_model_chunks(load_config(None, ["model.num_layers=1", "model.vocab_size=100"]))
    seen, forward = [], generation._model_forward

    def recording(*args):
        logits = forward(*args)
        seen.append(tuple(logits.shape))
        return logits

    monkeypatch.setattr(generation, "_model_forward", recording)
    prompts = [[2, 5, 6, 7, 8, 9], [2, 11, 12]]
    greedy = SamplingConfig(max_new_tokens=3, temperature=0)
    rollout = generation.generate(chunks, prompts, greedy, eos_id=3, pad_id=0, vocab_size=100,
                                  seed=1)
    assert seen[0] == (2, 1, 128) and all(shape == (2, 1, 128) for shape in seen), seen
    monkeypatch.setattr(generation, "last_position_logits", lambda chunks: contextlib.nullcontext())
    untrimmed = generation.generate(chunks, prompts, greedy, eos_id=3, pad_id=0, vocab_size=100,
                                    seed=1)
    assert torch.equal(rollout.tokens, untrimmed.tokens)
