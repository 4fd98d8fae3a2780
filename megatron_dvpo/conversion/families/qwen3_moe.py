"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's qk-norm attention with a mixture of
experts in every layer and no shared expert."""

from __future__ import annotations

from megatron_dvpo.config import ModelConfig
from megatron_dvpo.conversion.families import moe, qwen3
from megatron_dvpo.conversion.families.base import Family, Rule


def read(hf: dict) -> dict:
    return {**qwen3.read(hf), **moe.qwen_read(hf)}


def write(model: ModelConfig) -> dict:
    return {**qwen3.write(model), **moe.qwen_write(model)}


def mlp_rules(hf_layer: str, megatron_layer: str, model: ModelConfig) -> list[Rule]:
    return moe.expert_rules(hf_layer + "mlp.", megatron_layer + "mlp.", model)


FAMILY = Family(name="qwen3_moe", prefix="Qwen3Moe", read=read, write=write,
                layer_rules=qwen3.layer_rules, mlp_rules=mlp_rules)
