"""Qwen2 and Qwen2.5: the shared decoder with biases on the q, k and v projections.

HF's Qwen2 attention always has them (its config has no switch), so every Qwen2 model gets
``add_qkv_bias``; the sliding window counts only where ``use_sliding_window`` turns it on.
"""

from __future__ import annotations

from megatron_dvpo.config import ModelConfig
from megatron_dvpo.conversion.families.base import Family, Rule, refuse, window_positions


def read(hf: dict) -> dict:
    refuse(hf, ("mlp_bias",), "Qwen2")
    return {"add_qkv_bias": True, "max_position_embeddings": window_positions(hf)}


def layer_rules(hf_layer: str, megatron_layer: str, model: ModelConfig) -> list[Rule]:
    """The q, k and v biases, fused and ordered per query group like the weights."""
    if not model.add_qkv_bias:
        return []
    attn = hf_layer + "self_attn."
    return [Rule(megatron_layer + "self_attention.linear_qkv.bias",
                 tuple(f"{attn}{p}_proj.bias" for p in "qkv"), "qkv")]


FAMILY = Family(name="qwen2", prefix="Qwen2", read=read, layer_rules=layer_rules)
