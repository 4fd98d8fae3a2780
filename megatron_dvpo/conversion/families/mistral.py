"""Mistral: Llama's layers (and its refused biases) with a sliding attention window.

Full causal attention equals the window's up to its length, so the model is limited to it.
"""

from __future__ import annotations

from megatron_dvpo.conversion.families import llama
from megatron_dvpo.conversion.families.base import Family, window_positions


def read(hf: dict) -> dict:
    return {**llama.read(hf), "max_position_embeddings": window_positions(hf)}


FAMILY = Family(name="mistral", prefix="Mistral", read=read, write=llama.write)
