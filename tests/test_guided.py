"""GVM-guided decoding: the GVM's cached candidate values equal fresh forwards, so a large beta
picks the best-valued candidate of the policy's top k; beta 0 at temperature 0 is greedy."""

import torch

from megatron_dvpo.config import load_config
from megatron_dvpo.models.generation import SamplingConfig, generate
from megatron_dvpo.models.guided import GuideConfig, ValueGuide

PROMPTS = [[2, 17, 45, 9], [2, 88], [2, 5, 6, 7, 8]]


def _models():
    from megatron_dvpo.models.gpt import build_model_chunks
    from megatron_dvpo.models.gvm import build_gvm_chunks

    cfg = load_config(None, ["model.num_layers=2", "model.vocab_size=100"])
    return build_model_chunks(cfg), build_gvm_chunks(cfg, value_head_init_std=0.5)


def test_a_large_beta_picks_the_candidate_a_fresh_gvm_values_most(single_rank):
    from megatron_dvpo.models import forward

    policy, gvm = _models()
    greedy = SamplingConfig(max_new_tokens=6, temperature=0.0)
    rollout = generate(policy, PROMPTS, greedy, eos_id=-1, pad_id=0, vocab_size=100, seed=0,
                       guide=ValueGuide(gvm, GuideConfig(beta=1e4, top_k=4)))
    width = rollout.prompt_width
    for step in range(6):
        prefix = rollout.tokens[:, :width + step]
        logits = forward.run_microbatches(
            policy, [{"tokens": prefix, "left_pad": rollout.prompt_pad}],
            lambda out, batch: {"logits": out}, forward_only=True)[0]["logits"][:, -1, :100]
        candidates = logits.topk(4, dim=-1).indices  # [B, 4]
        rows = prefix.repeat_interleave(4, 0)
        extended = torch.cat([rows, candidates.reshape(-1, 1)], 1)
        values = forward.token_values(gvm, [{"tokens": extended,
                                             "left_pad": rollout.prompt_pad.repeat_interleave(4)}])
        best = candidates.gather(1, values[:, -1].view(3, 4).argmax(1, keepdim=True))[:, 0]
        assert torch.equal(rollout.tokens[:, width + step], best), step


def test_beta_zero_at_temperature_zero_is_greedy_decoding(single_rank):
    policy, gvm = _models()
    greedy = SamplingConfig(max_new_tokens=6, temperature=0.0)
    plain = generate(policy, PROMPTS, greedy, eos_id=-1, pad_id=0, vocab_size=100, seed=0)
    guided = generate(policy, PROMPTS, greedy, eos_id=-1, pad_id=0, vocab_size=100, seed=0,
                      guide=ValueGuide(gvm, GuideConfig(beta=0.0, top_k=4)))
    assert torch.equal(plain.tokens, guided.tokens)
    assert torch.allclose(plain.logprobs, guided.logprobs, atol=1e-6)
