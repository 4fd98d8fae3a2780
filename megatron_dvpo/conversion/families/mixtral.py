"""Mixtral: Mistral's attention with a mixture of experts in every layer.

Each token goes to ``num_experts_per_tok`` of ``num_local_experts`` SwiGLU experts, weighted
by a softmax over the chosen experts' router logits; HF's softmax over all experts, top-k and
renormalisation give the same weights as megatron's top-k then softmax
(``moe_router_pre_softmax=false``). ``router_aux_loss_coef`` becomes the load-balancing loss's
coefficient in training; the router's input jitter (a training-only noise) is refused.
"""

from __future__ import annotations

from megatron_dvpo.config import ModelConfig
from megatron_dvpo.conversion.families import llama
from megatron_dvpo.conversion.families.base import Family, Rule, refuse, window_positions
from megatron_dvpo.conversion.families.moe import expert_rules
from megatron_dvpo.conversion.safetensors_io import CheckpointError


def read(hf: dict) -> dict:
    refuse(hf, ("router_jitter_noise",), "Mixtral")
    if "num_local_experts" not in hf or "num_experts_per_tok" not in hf:
        raise CheckpointError("a Mixtral config needs num_local_experts and num_experts_per_tok")
    return {**llama.read(hf), "max_position_embeddings": window_positions(hf),
            "num_experts": hf["num_local_experts"], "moe_router_topk": hf["num_experts_per_tok"],
            "moe_aux_loss_coeff": float(hf.get("router_aux_loss_coef", 0.0))}


def write(model: ModelConfig) -> dict:
    return {**llama.write(model), "num_local_experts": model.num_experts,
            "num_experts_per_tok": model.moe_router_topk,
            "router_aux_loss_coef": model.moe_aux_loss_coeff, "router_jitter_noise": 0.0}


def mlp_rules(hf_layer: str, megatron_layer: str, model: ModelConfig) -> list[Rule]:
    """The router, then each expert's [w1 (gate); w3 (up)] and w2 (down)."""
    return expert_rules(hf_layer + "block_sparse_moe.", megatron_layer + "mlp.", model,
                        names=("w1", "w3", "w2"))


FAMILY = Family(name="mixtral", prefix="Mixtral", read=read, write=write, mlp_rules=mlp_rules)
