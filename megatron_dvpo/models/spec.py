"""Which transformer-layer implementation a run uses: Transformer Engine or megatron's local one."""

from __future__ import annotations

from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_dvpo.config import ModelConfig
from megatron_dvpo.models.attention import SDPACoreAttention
from megatron_dvpo.models.norm import TorchNorm


def layer_spec(model: ModelConfig, use_te: bool) -> ModuleSpec:
    """One transformer layer: TE's fused norm+linear modules (where FP8 runs), or megatron's local
    ones with our norms; attention is SDPA in both.

    TE's attention reads the layer's mask *type* and drops an explicit ``attention_mask`` under
    ``causal``, so left-padded rollout prompts would be attended to; SDPA takes our padding mask.
    """
    from megatron.core.models.gpt import gpt_layer_specs

    qk, experts = model.qk_layernorm, model.num_experts
    if use_te:
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=experts, moe_grouped_gemm=False, qk_layernorm=qk)
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(
            num_experts=experts, moe_grouped_gemm=False, normalization=model.normalization,
            qk_layernorm=qk)
        spec.submodules.input_layernorm = TorchNorm
        spec.submodules.pre_mlp_layernorm = TorchNorm
        if experts:  # checkpoint keys as TE's MoE layers write them (no fused MLP norm there)
            spec.submodules.sharded_state_dict_keys_map.pop("pre_mlp_layernorm.", None)
        if qk:  # TP ranks hold other heads: megatron sums these norms' gradients over TP
            spec.submodules.self_attention.submodules.q_layernorm = TorchNorm
            spec.submodules.self_attention.submodules.k_layernorm = TorchNorm
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec


def decoder_spec(model: ModelConfig, config: TransformerConfig, use_te: bool,
                 vp_stage: int | None) -> ModuleSpec | TransformerBlockSubmodules:
    """The decoder of this pipeline stage; local blocks also get our final norm."""
    if use_te:
        return layer_spec(model, use_te)
    layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer_spec(model, use_te)] * layers,
                                      layer_norm=TorchNorm)
