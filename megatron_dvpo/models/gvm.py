"""The Global Value Model: a GPTModel whose LM head is replaced by a scalar value head.

The head is a replicated ``Linear(hidden, K)`` computed in fp32 (docs/algorithm.md §1): K = 1
value, or with ``model.value_heads`` K > 1 an ensemble of K heads on one trunk (``gvm/heads.py``
reads it). It reads
the full final-layernorm output on every TP rank, so each TP rank computes the same value and the
same head gradient: no TP reduction is needed. Under sequence parallelism the hidden states are
gathered first, with a backward that only splits (the head is replicated, not TP-partitioned).

Its parameters have the model's dtype, like every other parameter: in bf16 the mixed-precision
optimizer keeps their fp32 main copy, and megatron's optimizer checkpoint describes only
parameters of the model's dtype (an fp32 parameter in a bf16 model cannot be saved).
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

from megatron_dvpo.config import RunConfig
from megatron_dvpo.models.gpt import build_model_chunks


class ValueHead(torch.nn.Module):
    """Replicated fp32 head of ``heads`` values, called like megatron's output layer."""

    def __init__(self, hidden_size: int, sequence_parallel: bool, dtype: torch.dtype,
                 init_std: float = 0.0, heads: int = 1):
        super().__init__()
        weight = torch.zeros(heads, hidden_size, dtype=torch.float32)
        if init_std > 0:  # one draw per head: their differences are the ensemble's spread
            torch.nn.init.normal_(weight, std=init_std)  # drawn in fp32 whatever the dtype
        self.weight = torch.nn.Parameter(weight.to(dtype))
        self.bias = torch.nn.Parameter(torch.zeros(heads, dtype=dtype))
        self.sequence_parallel = sequence_parallel

    def forward(self, hidden_states, weight=None, runtime_gather_output=None):
        if self.sequence_parallel:
            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False)
        values = torch.nn.functional.linear(hidden_states.float(), self.weight.float(),
                                            self.bias.float())
        return values, None


class GlobalValueModel(GPTModel):
    """GPTModel -> [batch, seq] fp32 values ([batch, seq, K] with K heads) on the last pipeline
    stage (hidden states elsewhere)."""

    def __init__(self, *args, value_head_init_std: float = 0.0, value_heads: int = 1, **kwargs):
        if kwargs.get("share_embeddings_and_output_weights"):
            raise ValueError("a GVM has no LM head to tie: set model.tie_embeddings=false")
        super().__init__(*args, **kwargs)
        self.value_heads = value_heads
        if self.post_process:
            self.output_layer = ValueHead(self.config.hidden_size, self.config.sequence_parallel,
                                          self.config.params_dtype, value_head_init_std,
                                          value_heads)
            if torch.cuda.is_available():
                self.output_layer.cuda(torch.cuda.current_device())

    def forward(self, *args, **kwargs):
        if kwargs.get("labels") is not None:
            raise ValueError("a GVM predicts values, it has no language-model loss")
        output = super().forward(*args, **kwargs)
        return output.squeeze(-1) if self.post_process and self.value_heads == 1 else output


def gvm_config(cfg: RunConfig) -> RunConfig:
    """The GVM counterpart of a (policy) config: a value head, never tied to the embedding."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, value_head=True,
                                                              tie_embeddings=False))


def build_gvm_chunks(cfg: RunConfig, value_head_init_std: float = 0.0,
                     initialize: bool = True) -> list[GlobalValueModel]:
    return build_model_chunks(gvm_config(cfg), model_class=GlobalValueModel,
                              initialize=initialize, value_head_init_std=value_head_init_std,
                              value_heads=cfg.model.value_heads)
