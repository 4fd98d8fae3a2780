"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2's attention (q, k and v biases) with a
mixture of experts in every layer plus a shared expert, added to every token's output and
scaled by ``sigmoid(shared_expert_gate(x))`` (megatron's ``moe_shared_expert_gate``)."""

from __future__ import annotations

from megatron_dvpo.config import ModelConfig
from megatron_dvpo.conversion.families import moe, qwen2
from megatron_dvpo.conversion.families.base import Family, Rule, refuse
from megatron_dvpo.conversion.safetensors_io import CheckpointError


def read(hf: dict) -> dict:
    refuse(hf, ("mlp_bias",), "Qwen2-MoE")
    shared = hf.get("shared_expert_intermediate_size")
    if not shared:
        raise CheckpointError("a Qwen2-MoE config needs shared_expert_intermediate_size")
    return {**qwen2.read(hf), **moe.qwen_read(hf), "add_qkv_bias": hf.get("qkv_bias", True),
            "moe_shared_expert_intermediate_size": shared, "moe_shared_expert_gate": True}


def write(model: ModelConfig) -> dict:
    return {**moe.qwen_write(model), "qkv_bias": model.add_qkv_bias,
            "shared_expert_intermediate_size": model.moe_shared_expert_intermediate_size}


def mlp_rules(hf_layer: str, megatron_layer: str, model: ModelConfig) -> list[Rule]:
    """The routed experts, then the shared expert and its gate."""
    hf_mlp, mlp = hf_layer + "mlp.", megatron_layer + "mlp."
    shared, ours = hf_mlp + "shared_expert.", mlp + "shared_experts."
    return moe.expert_rules(hf_mlp, mlp, model) + [
        Rule(ours + "linear_fc1.weight", (shared + "gate_proj.weight", shared + "up_proj.weight"),
             "fc1"),
        Rule(ours + "linear_fc2.weight", (shared + "down_proj.weight",), "copy"),
        Rule(ours + "gate_weight", (hf_mlp + "shared_expert_gate.weight",), "copy")]


FAMILY = Family(name="qwen2_moe", prefix="Qwen2Moe", read=read, write=write,
                layer_rules=qwen2.layer_rules, mlp_rules=mlp_rules)
