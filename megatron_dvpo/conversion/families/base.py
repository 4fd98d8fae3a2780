"""What a family module builds on: the ``Family`` record it exports, the ``Rule`` its extra
tensors are stated in, and the config helpers more than one family needs.

Everything Llama-style that every family shares (required keys, RoPE, heads and groups, the
common per-layer tensors) lives in ``hf_config.py`` and ``mapping.py``; a family states only
how it differs, so adding one never touches the shared code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from megatron_dvpo.config import ModelConfig
from megatron_dvpo.conversion.safetensors_io import CheckpointError

# The HF task heads every family is read with; the causal LM is the one a model exports as.
HEADS = ("ForCausalLM", "ForSequenceClassification")


@dataclass(frozen=True)
class Rule:
    """One megatron parameter and the HF tensors it is made of (``kind``: how, mapping.py)."""

    megatron: str
    hf: tuple[str, ...]
    kind: str  # copy | qkv | fc1 | vocab_rows | value_head


def _nothing(_) -> dict:
    return {}


def _no_rules(hf_layer: str, megatron_layer: str, model: ModelConfig) -> list[Rule]:
    return []


@dataclass(frozen=True)
class Family:
    """How one HF model family differs from the shared Llama-style decoder.

    ``read`` turns config.json into the ``ModelConfig`` fields the shared reader does not set
    (or overrides), raising ``CheckpointError`` for what our layers cannot build; ``write`` is
    its inverse, the config.json keys the shared writer does not write; ``layer_rules`` gives
    the tensors a layer has beyond the shared ones, from the layer's HF and megatron name
    prefixes (``model.layers.3.``, ``decoder.layers.3.``); ``mlp_rules``, in the same form,
    replaces the shared dense MLP's (a mixture of experts).
    """

    name: str  # HF's model_type
    prefix: str  # the architectures are <prefix>ForCausalLM and <prefix>ForSequenceClassification
    read: Callable[[dict], dict] = _nothing
    write: Callable[[ModelConfig], dict] = _nothing
    layer_rules: Callable[[str, str, ModelConfig], list[Rule]] = _no_rules
    # the layer's MLP when it is not the shared dense one (a mixture of experts), else None
    mlp_rules: Optional[Callable[[str, str, ModelConfig], list[Rule]]] = None

    @property
    def architectures(self) -> tuple[str, ...]:
        return tuple(self.prefix + head for head in HEADS)


def refuse(hf: dict, keys: tuple[str, ...], layers: str) -> None:
    """HF options our megatron layers do not build are refused, never silently dropped."""
    if any(hf.get(key) for key in keys):
        raise CheckpointError(f"{'/'.join(keys)} on {layers} layers is not supported")


def window_positions(hf: dict) -> int:
    """``max_position_embeddings``, capped at the sliding window where the config uses one.

    Our attention is full causal; it equals sliding-window attention up to the window, so a
    model converted from a sliding-window config is limited to it.
    """
    positions = hf.get("max_position_embeddings", 4096)
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    return min(positions, window) if window else positions
