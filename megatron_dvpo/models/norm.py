"""torch LayerNorm/RMSNorm for megatron's local spec, usable under sequence parallelism.

megatron's ``WrappedTorchNorm`` refuses sequence parallelism. Under SP each TP rank normalises a
different slice of the sequence, so the norm weights' gradients must be summed over TP: tagging
them ``sequence_parallel`` makes ``finalize_model_grads`` do exactly that. Parameters are created
in ``params_dtype`` like every other megatron layer.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class TorchNorm:
    """Builds ``torch.nn.RMSNorm`` or ``torch.nn.LayerNorm``; called like megatron's norms."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                persist_layer_norm: bool = False, zero_centered_gamma: bool = False,
                normalization: str | None = None):
        if config.layernorm_zero_centered_gamma or zero_centered_gamma:
            raise ValueError("zero-centred gamma needs Transformer Engine norms")
        kind = normalization or config.normalization
        norm_cls = {"RMSNorm": torch.nn.RMSNorm, "LayerNorm": torch.nn.LayerNorm}[kind]
        norm = norm_cls(hidden_size, eps=eps, dtype=config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
