"""Llama 2 and 3.x: the shared decoder as it is.

HF's optional attention and MLP biases (``attention_bias``, ``mlp_bias``) are not built by our
layers: they are refused on import and written as off on export.
"""

from __future__ import annotations

from megatron_dvpo.config import ModelConfig
from megatron_dvpo.conversion.families.base import Family, refuse


def read(hf: dict) -> dict:
    refuse(hf, ("attention_bias", "mlp_bias"), "Llama or Mistral")
    return {}


def write(model: ModelConfig) -> dict:
    return {"attention_bias": False}


FAMILY = Family(name="llama", prefix="Llama", read=read, write=write)
