"""Which transformer-layer implementation a run uses: Transformer Engine or megatron's local one."""

from __future__ import annotations

import importlib.util

import torch
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_dvpo.config import ConfigError, ModelConfig, PrecisionConfig
from megatron_dvpo.models.attention import SDPACoreAttention
from megatron_dvpo.models.norm import TorchNorm


def transformer_engine_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def use_transformer_engine(precision: PrecisionConfig, te_available: bool | None = None) -> bool:
    """Resolve ``precision.transformer_impl``; asking for what cannot run is an error, not a fallback."""
    if te_available is None:
        te_available = transformer_engine_available()
    impl = precision.transformer_impl
    if impl == "transformer_engine" and not te_available:
        raise ConfigError("precision.transformer_impl=transformer_engine needs a CUDA GPU and the "
                          "transformer_engine package (NGC PyTorch container, or the `gpu` extra)")
    if precision.fp8 is not None and not (te_available and impl != "local"):
        raise ConfigError(f"precision.fp8={precision.fp8} needs Transformer Engine on a CUDA GPU "
                          "with FP8 support (Hopper or newer); FP8 never falls back to bf16 "
                          "silently. Unset precision.fp8 to train in bf16.")
    return impl == "transformer_engine" or (impl == "auto" and te_available)


def layer_spec(model: ModelConfig, use_te: bool) -> ModuleSpec:
    """One transformer layer: TE's fused modules, or megatron's local ones with our substitutes."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization=model.normalization)
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    spec.submodules.input_layernorm = TorchNorm
    spec.submodules.pre_mlp_layernorm = TorchNorm
    return spec


def decoder_spec(model: ModelConfig, config: TransformerConfig, use_te: bool,
                 vp_stage: int | None) -> ModuleSpec | TransformerBlockSubmodules:
    """The decoder of this pipeline stage; local blocks also get our final norm."""
    if use_te:
        return layer_spec(model, use_te)
    layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer_spec(model, use_te)] * layers,
                                      layer_norm=TorchNorm)
