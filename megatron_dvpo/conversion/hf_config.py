"""HF ``config.json`` <-> our ``ModelConfig``: the Llama-style decoder keys every family shares.

What a family reads or refuses beyond them, and writes back, is its ``read``/``write`` in
``families/``; nothing here names a family.
"""

from __future__ import annotations

from megatron_dvpo.config import ModelConfig
from megatron_dvpo.conversion.families import ARCHITECTURES, Family, family_of
from megatron_dvpo.conversion.safetensors_io import CheckpointError


def family_from_hf(hf: dict) -> Family:
    """The family of the config's single architecture (a causal LM or a sequence classifier)."""
    archs = hf.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise CheckpointError(f"unsupported architecture {archs or hf.get('model_type')!r}; "
                              f"supported: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[archs[0]]


def _rope(hf: dict) -> tuple[float, dict | None]:
    """(theta, llama3 scaling or None) from either the transformers 5 or the older layout."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind in (None, "default"):
        return float(theta), None
    if kind != "llama3":
        raise CheckpointError(f"rope scaling type {kind!r} is not supported (only llama3)")
    return float(theta), scaling


REQUIRED_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
                 "vocab_size")


def model_config_from_hf(hf: dict, source=None) -> ModelConfig:
    """Our model section for an HF config; errors name ``source`` (the config.json) if given."""
    try:
        if not isinstance(hf, dict):
            raise CheckpointError("the top level must be a JSON object")
        family = family_from_hf(hf)
        missing = [k for k in REQUIRED_KEYS if k not in hf]
        if missing:
            raise CheckpointError(f"missing keys {missing}")
        return _model_config(hf, family)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}" if source else str(e)) from None


def _model_config(hf: dict, family: Family) -> ModelConfig:
    """The shared decoder's fields, then the family's own (which may override them)."""
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"hidden_act={hf['hidden_act']!r} is not supported (only silu)")
    own = family.read(hf)
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    theta, scaling = _rope(hf)
    fields = dict(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        ffn_hidden_size=hf["intermediate_size"],
        kv_channels=head_dim if head_dim * heads != hf["hidden_size"] else None,
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        normalization="RMSNorm",
        norm_epsilon=hf.get("rms_norm_eps", 1e-6),
        activation="swiglu",
        rotary_base=theta,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        hf_architecture=family.architectures[0],  # a reward model's trunk exports as its LM
    )
    model = ModelConfig(**{**fields, **own})
    if scaling is not None:
        model.rope_scaling_factor = float(scaling["factor"])
        model.rope_scaling_low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
        model.rope_scaling_high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
        model.rope_scaling_original_max_position = int(
            scaling.get("original_max_position_embeddings", 8192))
    return model


def hf_config_from_model(model: ModelConfig) -> dict:
    """A config.json for a model that did not come from HF (or lost its original config)."""
    family = family_of(model)
    hf = {
        "architectures": [model.hf_architecture],
        "model_type": family.name,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.query_groups,
        "head_dim": model.head_dim,
        "vocab_size": model.vocab_size,
        "max_position_embeddings": model.max_position_embeddings,
        "rms_norm_eps": model.norm_epsilon,
        "hidden_act": "silu",
        "tie_word_embeddings": model.tie_embeddings,
        "rope_theta": model.rotary_base,
    }
    if model.rope_scaling_factor is not None:
        hf["rope_scaling"] = {
            "rope_type": "llama3", "factor": model.rope_scaling_factor,
            "low_freq_factor": model.rope_scaling_low_freq_factor,
            "high_freq_factor": model.rope_scaling_high_freq_factor,
            "original_max_position_embeddings": model.rope_scaling_original_max_position}
    hf.update(family.write(model))
    return hf
