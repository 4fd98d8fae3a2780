"""Core attention on ``F.scaled_dot_product_attention`` for megatron's local layer spec.

megatron's local ``DotProductAttention`` takes its score buffer from a CUDA-only global memory
buffer, and TE's attention ignores explicit padding masks under a causal mask type, so both layer
specs use this module (models/spec.py). It keeps megatron's tensor layout and mask convention
(``True`` = masked out).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


def allowed_positions(sq: int, sk: int, causal: bool, attention_mask: Optional[torch.Tensor],
                      device) -> Optional[torch.Tensor]:
    """Boolean [.., sq, sk] mask of the keys each query may attend to, or None for all.

    Causal masking is aligned bottom-right: with a KV cache the sq queries are the last sq of the
    sk positions, so query i sits at position sk - sq + i. Rows that would be fully masked (left
    padding) attend everywhere instead, so they produce finite values rather than NaN.
    """
    allowed = None
    if causal and sq > 1:
        allowed = torch.ones(sq, sk, dtype=torch.bool, device=device).tril(diagonal=sk - sq)
    if attention_mask is not None:
        keep = ~attention_mask.to(torch.bool)
        allowed = keep if allowed is None else allowed & keep
    if allowed is not None:
        allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    return allowed


class SDPACoreAttention(MegatronModule):
    """Drop-in for megatron's ``core_attention`` slot: [sq, b, np, hn] in, [sq, b, np*hn] out."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None):
        super().__init__(config=config)  # context parallelism: refused by validate_parallel
        tp_size = (pg_collection.tp.size() if pg_collection is not None
                   else parallel_state.get_tensor_model_parallel_world_size())
        self.heads_per_partition = config.num_attention_heads // tp_size
        self.groups_per_partition = config.num_query_groups // tp_size
        self.softmax_scale = softmax_scale or config.kv_channels ** -0.5
        # Causal LMs are causal in every mode. During KV-cache decoding megatron passes
        # attn_mask_type=no_mask, so the construction-time type is the one that counts.
        self.causal = attn_mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        self.dropout_p = (config.attention_dropout if attention_dropout is None
                          else attention_dropout)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("packed sequences and attention bias need TE attention")
        sq, batch = query.shape[0], query.shape[1]
        sk = key.shape[0]
        # [s, b, heads, hn] -> [b, heads, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        # Plain causal attention (training, scoring without padding) keeps SDPA's flash kernels.
        plain_causal = self.causal and attention_mask is None and sq == sk
        mask = (None if plain_causal
                else allowed_positions(sq, sk, self.causal, attention_mask, query.device))
        dropout_p = self.dropout_p if self.training else 0.0
        rng = (tensor_parallel.get_cuda_rng_tracker().fork()
               if dropout_p > 0 and not self.config.sequence_parallel else contextlib.nullcontext())
        with rng:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=plain_causal and sq > 1, dropout_p=dropout_p,
                scale=self.softmax_scale,
                enable_gqa=self.heads_per_partition != self.groups_per_partition)
        return out.permute(2, 0, 1, 3).reshape(sq, batch, -1)
