"""The HF model families the converters read and write, one module each.

Adding a family is one module that builds a ``Family`` (base.py; qwen2.py is a full example)
and one entry in ``FAMILIES``. ``ModelConfig.hf_architecture`` names the family a model
round-trips to.
"""

from __future__ import annotations

from megatron_dvpo.config import ModelConfig
from megatron_dvpo.conversion.families import (llama, mistral, mixtral, qwen2, qwen2_moe, qwen3,
                                               qwen3_moe)
from megatron_dvpo.conversion.families.base import HEADS, Family, Rule

__all__ = ["ARCHITECTURES", "FAMILIES", "Family", "Rule", "family_of"]

FAMILIES: dict[str, Family] = {f.name: f for f in (llama.FAMILY, mistral.FAMILY, qwen2.FAMILY,
                                                   qwen3.FAMILY, mixtral.FAMILY,
                                                   qwen2_moe.FAMILY, qwen3_moe.FAMILY)}

# HF architecture -> its family: every family's causal LM, then every sequence classifier
# (reward models, read as GVM sources); error messages list them in this order.
ARCHITECTURES: dict[str, Family] = {
    family.prefix + head: family for head in HEADS for family in FAMILIES.values()}


def family_of(model: ModelConfig) -> Family:
    """The family ``model`` round-trips to. An ``hf_architecture`` no family claims (a config
    written by hand) exports as the shared decoder alone: a Llama."""
    return ARCHITECTURES.get(model.hf_architecture, FAMILIES["llama"])
