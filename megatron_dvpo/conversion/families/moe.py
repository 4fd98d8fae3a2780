"""What the mixture-of-experts families share: their config keys and their MLP's tensors.

A layer's MLP is a router (``[experts, hidden]``) and SwiGLU experts, each stored as its own
gate, up and down projections, and optionally (Qwen2-MoE) a shared expert added to every
token's output, scaled by a sigmoid gate. Every layer must be an MoE layer.
"""

from __future__ import annotations

from megatron_dvpo.config import ModelConfig
from megatron_dvpo.conversion.families.base import Rule
from megatron_dvpo.conversion.safetensors_io import CheckpointError

QWEN_EXPERT = ("gate_proj", "up_proj", "down_proj")  # the names of one expert's projections


def qwen_read(hf: dict) -> dict:
    """Qwen2-MoE's and Qwen3-MoE's routing keys. ``norm_topk_prob`` renormalises the top-k
    weights (the softmax over the top-k logits, megatron's default); without it they stay the
    softmax over all experts (``moe_router_pre_softmax``)."""
    experts = hf.get("num_experts", hf.get("num_local_experts"))  # transformers 5 writes the latter
    missing = [k for k in ("num_experts_per_tok", "moe_intermediate_size") if k not in hf]
    if missing or experts is None:
        raise CheckpointError(f"missing keys {missing + ['num_experts'] * (experts is None)}")
    if hf.get("decoder_sparse_step", 1) != 1 or hf.get("mlp_only_layers"):
        raise CheckpointError("dense layers between MoE layers (decoder_sparse_step="
                              f"{hf.get('decoder_sparse_step', 1)}, mlp_only_layers="
                              f"{hf.get('mlp_only_layers')}) are not supported")
    return {"num_experts": experts, "moe_router_topk": hf["num_experts_per_tok"],
            "moe_ffn_hidden_size": hf["moe_intermediate_size"],
            "moe_router_pre_softmax": not hf.get("norm_topk_prob", False),
            "moe_aux_loss_coeff": float(hf.get("router_aux_loss_coef", 0.0))}


def qwen_write(model: ModelConfig) -> dict:
    return {"num_experts": model.num_experts, "num_experts_per_tok": model.moe_router_topk,
            "moe_intermediate_size": model.expert_ffn_size,
            "norm_topk_prob": not model.moe_router_pre_softmax,
            "router_aux_loss_coef": model.moe_aux_loss_coeff, "decoder_sparse_step": 1,
            "mlp_only_layers": []}


def expert_rules(hf_mlp: str, megatron_mlp: str, model: ModelConfig, router: str = "gate",
                 experts: str = "experts", names: tuple[str, str, str] = QWEN_EXPERT
                 ) -> list[Rule]:
    """The router, then each expert's fused [gate; up] and its down projection; ``names``: an
    expert's gate, up and down projections as the family stores them."""
    gate, up, down = names
    rules = [Rule(megatron_mlp + "router.weight", (f"{hf_mlp}{router}.weight",), "copy")]
    for j in range(model.num_experts):
        theirs, ours = f"{hf_mlp}{experts}.{j}.", f"{megatron_mlp}experts.local_experts.{j}."
        rules += [Rule(ours + "linear_fc1.weight", (f"{theirs}{gate}.weight",
                                                    f"{theirs}{up}.weight"), "fc1"),
                  Rule(ours + "linear_fc2.weight", (f"{theirs}{down}.weight",), "copy")]
    return rules
