"""Qwen3 (dense): the shared decoder with an RMSNorm on each head's query and key (qk-norm),
applied before RoPE as megatron's ``qk_layernorm`` is, and its own ``head_dim`` (often not
``hidden_size / heads``; the shared reader takes it as ``kv_channels``)."""

from __future__ import annotations

from megatron_dvpo.config import ModelConfig
from megatron_dvpo.conversion.families.base import Family, Rule, refuse, window_positions


def read(hf: dict) -> dict:
    refuse(hf, ("attention_bias",), "Qwen3")
    return {"qk_layernorm": True, "max_position_embeddings": window_positions(hf)}


def write(model: ModelConfig) -> dict:
    return {"attention_bias": False}


def layer_rules(hf_layer: str, megatron_layer: str, model: ModelConfig) -> list[Rule]:
    """The per-head query and key norms (one ``head_dim`` weight each, shared by the heads)."""
    attn, ours = hf_layer + "self_attn.", megatron_layer + "self_attention."
    return [Rule(f"{ours}{m}_layernorm.weight", (f"{attn}{h}_norm.weight",), "copy")
            for m, h in (("q", "q"), ("k", "k"))]


FAMILY = Family(name="qwen3", prefix="Qwen3", read=read, write=write, layer_rules=layer_rules)
