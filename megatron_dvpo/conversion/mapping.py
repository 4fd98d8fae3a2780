"""Which HF tensors make up each megatron parameter, and how, in both directions.

Names are those of a TP=1, PP=1 megatron model with the local or the Transformer Engine layer
spec; dist checkpoints map them to layout-independent keys, so the same table serves any TP/PP
on load. The two specs differ only in the norms: TE fuses each into the linear after it.
"""

from __future__ import annotations

import re

import torch

from megatron_dvpo.config import ModelConfig
from megatron_dvpo.conversion.families import Rule, family_of
from megatron_dvpo.conversion.safetensors_io import CheckpointError, SafetensorsReader

# Value/reward heads other projects save, as (weight, bias or None): TRL, then HF
# *ForSequenceClassification / OpenRLHF, then verl's single-row heads.
VALUE_HEADS = [("v_head.summary.weight", "v_head.summary.bias"), ("score.weight", None),
               ("reward_head.weight", None), ("lm_head.weight", None)]
TRL_VALUE_HEAD = VALUE_HEADS[0]


# Local-spec name -> TE-spec name (prefix rewrites). megatron-core's local spec writes its dist
# checkpoints under the TE names (its ``sharded_state_dict_keys_map``, tested to equal this), so
# a checkpoint of either spec holds the same keys and loads into the other.
TE_NAMES = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
            "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
SPECS = ("local", "te")


def spec_name(local_name: str, spec: str, moe: bool = False) -> str:
    """A parameter's name in a model built with ``spec`` (``local`` or ``te``). TE fuses no
    norm into a mixture of experts: its ``pre_mlp_layernorm`` keeps its name."""
    if spec == "te":
        for old, new in TE_NAMES.items():
            if not (moe and old == "pre_mlp_layernorm."):
                local_name = local_name.replace(f".{old}", f".{new}")
    return local_name


def dense_mlp_rules(hf_layer: str, megatron_layer: str, model: ModelConfig) -> list[Rule]:
    return [Rule(megatron_layer + "mlp.linear_fc1.weight",
                 (hf_layer + "mlp.gate_proj.weight", hf_layer + "mlp.up_proj.weight"), "fc1"),
            Rule(megatron_layer + "mlp.linear_fc2.weight", (hf_layer + "mlp.down_proj.weight",),
                 "copy")]


def _layer_rules(i: int, model: ModelConfig) -> list[Rule]:
    """Layer ``i``'s tensors: those of every Llama-style layer, its family's MLP (the shared
    dense one unless the family has its own), then its family's own extras."""
    src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
    attn = src + "self_attn."
    family = family_of(model)
    rules = [
        Rule(dst + "input_layernorm.weight", (src + "input_layernorm.weight",), "copy"),
        Rule(dst + "self_attention.linear_qkv.weight",
             tuple(f"{attn}{p}_proj.weight" for p in "qkv"), "qkv"),
        Rule(dst + "self_attention.linear_proj.weight", (attn + "o_proj.weight",), "copy"),
        Rule(dst + "pre_mlp_layernorm.weight", (src + "post_attention_layernorm.weight",),
             "copy"),
    ]
    rules += (family.mlp_rules or dense_mlp_rules)(src, dst, model)
    return rules + family.layer_rules(src, dst, model)


def find_value_head(keys: set[str], shapes: dict[str, list[int]]) -> tuple[str, ...] | None:
    """The value head a checkpoint carries, if any: a single-row weight (and maybe a bias)."""
    for weight, bias in VALUE_HEADS:
        if weight in keys and shapes[weight][0] == 1:
            return (weight, bias) if bias in keys else (weight,)
    return None


def weight_rules(model: ModelConfig, value_head: tuple[str, ...] | None = None,
                 spec: str = "local") -> list[Rule]:
    """Every megatron parameter of ``model`` (built with layer ``spec``) with the HF tensors it
    comes from.

    For a GVM (``model.value_head``) ``value_head`` names the HF head to import; None leaves the
    zero-initialised head of docs/algorithm.md §1 (its rule lists no HF tensors).
    """
    if spec not in SPECS:
        raise ValueError(f"spec must be one of {SPECS}, got {spec!r}")
    rules = _local_rules(model, value_head)
    moe = bool(model.num_experts)
    return [Rule(spec_name(r.megatron, spec, moe), r.hf, r.kind) for r in rules]


def _local_rules(model: ModelConfig, value_head: tuple[str, ...] | None) -> list[Rule]:
    rules = [Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",),
                  "vocab_rows")]
    for i in range(model.num_layers):
        rules += _layer_rules(i, model)
    rules.append(Rule("decoder.final_layernorm.weight", ("model.norm.weight",), "copy"))
    if model.value_head:
        head = value_head or ()
        rules.append(Rule("output_layer.weight", head[:1], "value_head"))
        rules.append(Rule("output_layer.bias", head[1:], "value_head"))
    elif not model.tie_embeddings:
        rules.append(Rule("output_layer.weight", ("lm_head.weight",), "vocab_rows"))
    return rules


def _groups(model: ModelConfig) -> tuple[int, int, int]:
    heads = model.num_attention_heads
    groups, head_dim = model.query_groups, model.head_dim
    return groups, heads // groups, head_dim


def read_megatron(rule: Rule, out: torch.Tensor, reader: SafetensorsReader,
                  model: ModelConfig) -> None:
    """Fill the megatron parameter ``out`` from the HF tensors of ``rule``, row range by row
    range."""
    if rule.kind == "copy":
        reader.read_rows_into(rule.hf[0], out)
    elif rule.kind == "vocab_rows":  # pad the vocabulary with zero rows
        reader.read_rows_into(rule.hf[0], out[:model.vocab_size])
        out[model.vocab_size:].zero_()
    elif rule.kind == "fc1":  # [gate; up]
        half = out.shape[0] // 2
        reader.read_rows_into(rule.hf[0], out[:half])
        reader.read_rows_into(rule.hf[1], out[half:])
    elif rule.kind == "qkv":  # per query group: its query heads, then its key, then its value
        groups, per_group, head_dim = _groups(model)
        block = out.view(groups, (per_group + 2) * head_dim, *out.shape[1:])
        for g in range(groups):
            q_rows = per_group * head_dim
            reader.read_rows_into(rule.hf[0], block[g, :q_rows], first_row=g * q_rows)
            reader.read_rows_into(rule.hf[1], block[g, q_rows:q_rows + head_dim],
                                  first_row=g * head_dim)
            reader.read_rows_into(rule.hf[2], block[g, q_rows + head_dim:],
                                  first_row=g * head_dim)
    elif rule.kind == "value_head":
        if rule.hf:
            reader.read_rows_into(rule.hf[0], out.view(1, -1))
        else:
            out.zero_()
    else:
        raise AssertionError(rule.kind)


def to_hf(rule: Rule, tensor: torch.Tensor, model: ModelConfig) -> dict[str, torch.Tensor]:
    """Split one megatron parameter into the HF tensors of ``rule``."""
    if rule.kind == "copy":
        return {rule.hf[0]: tensor}
    if rule.kind == "vocab_rows":
        return {rule.hf[0]: tensor[:model.vocab_size]}
    if rule.kind == "fc1":
        gate, up = tensor.chunk(2, dim=0)
        return {rule.hf[0]: gate, rule.hf[1]: up}
    if rule.kind == "qkv":
        groups, per_group, head_dim = _groups(model)
        block = tensor.view(groups, (per_group + 2) * head_dim, *tensor.shape[1:])
        q, k, v = block.split([per_group * head_dim, head_dim, head_dim], dim=1)
        return {name: part.reshape(-1, *tensor.shape[1:])
                for name, part in zip(rule.hf, (q, k, v))}
    if rule.kind == "value_head":  # under TRL's names; K heads: [K, hidden] and [K]
        return {TRL_VALUE_HEAD[0] if rule.megatron.endswith("weight")
                else TRL_VALUE_HEAD[1]: tensor}
    raise AssertionError(rule.kind)


def stacked_index(megatron_name: str) -> tuple[int, ...]:
    """Where a parameter sits in its checkpoint tensor's leading (stacked) axes: its layer, and
    its expert within the layer (names of a single-rank model number experts globally)."""
    match = re.match(r"decoder\.layers\.(\d+)\.(?:.*\.local_experts\.(\d+)\.)?", megatron_name)
    if not match:
        return ()
    return tuple(int(g) for g in match.groups() if g is not None)


def check_keys(rules: list[Rule], reader: SafetensorsReader, ignorable: set[str]) -> None:
    """Missing and leftover HF tensors are errors: never drop weights silently."""
    needed = {name for rule in rules for name in rule.hf}
    present = reader.keys()
    missing = sorted(needed - present)
    if missing:
        raise CheckpointError(f"the HF checkpoint lacks {len(missing)} tensors: "
                              f"{missing[:10]}{' ...' if len(missing) > 10 else ''}")
    leftover = sorted(present - needed - ignorable)
    if leftover:
        raise CheckpointError(f"the HF checkpoint has {len(leftover)} tensors this conversion "
                              f"would drop: {leftover[:10]}{' ...' if len(leftover) > 10 else ''}"
                              " (a value head? use --target gvm)")
