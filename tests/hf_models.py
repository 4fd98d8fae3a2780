"""Tiny random HF checkpoints built from configs (no downloads), for conversion tests."""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Random values everywhere, norms included, so any mis-mapped tensor shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def build(kind: str, directory: Path, seed: int = 0) -> Path:
    """Save a tiny model of ``kind`` (a family's name, or llama_cls) to ``directory``."""
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "llama":  # GQA, Llama-3 RoPE scaling, untied embeddings
        config = tf.LlamaConfig(**COMMON, vocab_size=1000, rope_theta=500000.0,
                                rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 32})
        model = tf.LlamaForCausalLM(config)
    elif kind == "mistral":  # an odd vocabulary that needs padding
        model = tf.MistralForCausalLM(tf.MistralConfig(**COMMON, vocab_size=1001,
                                                       sliding_window=4096))
    elif kind == "qwen2":  # QKV bias, tied embeddings as in the small Qwen2 models
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**COMMON, vocab_size=1000,
                                                   tie_word_embeddings=True))
    elif kind == "qwen3":  # qk-norm, a head_dim that is not hidden_size / heads
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**COMMON, vocab_size=1000, head_dim=32,
                                                   tie_word_embeddings=False))
    elif kind == "mixtral":  # 4 experts, top-2
        model = tf.MixtralForCausalLM(tf.MixtralConfig(**COMMON, vocab_size=1000,
                                                       num_local_experts=4, num_experts_per_tok=2,
                                                       sliding_window=None))
    elif kind == "qwen2_moe":  # a shared expert and its gate, QKV bias, no top-k renormalising
        model = tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(
            **COMMON, vocab_size=1000, num_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=32, shared_expert_intermediate_size=48))
    elif kind == "qwen3_moe":  # qk-norm, renormalised top-k weights
        model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
            **COMMON, vocab_size=1000, num_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=32, head_dim=32, norm_topk_prob=True))
    elif kind == "llama_cls":  # a reward model: score.weight instead of lm_head
        model = tf.LlamaForSequenceClassification(tf.LlamaConfig(**COMMON, vocab_size=1000,
                                                                 num_labels=1, pad_token_id=0))
    else:
        raise ValueError(kind)
    _perturb(model, seed)
    model.save_pretrained(directory)
    return directory


def load(directory: Path):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(directory).eval()
