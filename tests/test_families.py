"""The model-family registry: each architecture finds its family, each family's config adapter
round-trips, and each family's extra tensors are its own."""

import pytest

from megatron_dvpo.config import ModelConfig
from megatron_dvpo.conversion.families import ARCHITECTURES, FAMILIES, family_of
from megatron_dvpo.conversion.hf_config import hf_config_from_model, model_config_from_hf
from megatron_dvpo.conversion.mapping import weight_rules
from megatron_dvpo.conversion.safetensors_io import CheckpointError

# What each family's tiny model has beyond the shared decoder's defaults.
OWN = {"llama": dict(rope_scaling_factor=8.0, rope_scaling_original_max_position=32),
       "mistral": {},
       "qwen2": dict(add_qkv_bias=True, tie_embeddings=True),
       "qwen3": dict(qk_layernorm=True, kv_channels=32),
       "mixtral": dict(num_experts=4, moe_router_topk=2, moe_aux_loss_coeff=0.02),
       "qwen2_moe": dict(add_qkv_bias=True, num_experts=4, moe_router_topk=2,
                         moe_ffn_hidden_size=32, moe_router_pre_softmax=True,
                         moe_shared_expert_intermediate_size=48, moe_shared_expert_gate=True),
       "qwen3_moe": dict(qk_layernorm=True, kv_channels=32, num_experts=4, moe_router_topk=2,
                         moe_ffn_hidden_size=32)}
QKV_BIAS = "decoder.layers.{}.self_attention.linear_qkv.bias"


def tiny(name: str, **changes) -> ModelConfig:
    return ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                       ffn_hidden_size=128, vocab_size=1000, max_position_embeddings=128,
                       rotary_base=500000.0, hf_architecture=FAMILIES[name].architectures[0],
                       **{**OWN[name], **changes})


def test_every_architecture_maps_to_its_family():
    assert sorted(OWN) == sorted(FAMILIES)  # a new family adds its tiny model above
    assert list(ARCHITECTURES)[:5] == ["LlamaForCausalLM", "MistralForCausalLM",
                                       "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                                       "MixtralForCausalLM"]
    causal, classifiers = zip(*(family.architectures for family in FAMILIES.values()))
    assert list(ARCHITECTURES) == [*causal, *classifiers]  # the order errors list them in
    assert "Qwen2ForSequenceClassification" in classifiers
    for name, family in FAMILIES.items():
        assert family.name == name
        for arch in family.architectures:
            assert ARCHITECTURES[arch] is family
            hf = hf_config_from_model(tiny(name))
            hf["architectures"] = [arch]  # a reward model's trunk exports as the causal LM
            assert model_config_from_hf(hf).hf_architecture == family.architectures[0]
    assert family_of(ModelConfig(hf_architecture="SomethingElse")) is FAMILIES["llama"]


@pytest.mark.parametrize("name", sorted(OWN))
def test_config_adapter_round_trips(name):
    model = tiny(name)
    hf = hf_config_from_model(model)
    assert hf["model_type"] == name and hf["architectures"] == [model.hf_architecture]
    assert hf.get("attention_bias", "absent") == (
        "absent" if name in ("qwen2", "qwen2_moe") else False)
    assert model_config_from_hf(hf) == model


def test_family_refusals_and_windows():
    llama = hf_config_from_model(tiny("llama"))
    with pytest.raises(CheckpointError, match=r"^attention_bias/mlp_bias on Llama or Mistral "
                                              r"layers is not supported$"):
        model_config_from_hf({**llama, "attention_bias": True})
    mistral = hf_config_from_model(tiny("mistral"))
    assert model_config_from_hf({**mistral, "sliding_window": 64}).max_position_embeddings == 64
    with pytest.raises(CheckpointError, match="attention_bias/mlp_bias on Llama or Mistral"):
        model_config_from_hf({**mistral, "mlp_bias": True})
    qwen2 = hf_config_from_model(tiny("qwen2"))
    assert model_config_from_hf({**qwen2, "attention_bias": True}).add_qkv_bias
    windowed = {**qwen2, "sliding_window": 64}
    assert model_config_from_hf(windowed).max_position_embeddings == 64
    assert model_config_from_hf({**windowed, "use_sliding_window": False}
                                ).max_position_embeddings == 128  # as Qwen2 configs have it
    with pytest.raises(CheckpointError, match=r"^mlp_bias on Qwen2 layers is not supported$"):
        model_config_from_hf({**qwen2, "mlp_bias": True})


def test_qkv_bias_rules_are_qwen2s():
    def biases(model):
        return {r.megatron: r for r in weight_rules(model) if r.megatron.endswith(".bias")}

    qwen2 = biases(tiny("qwen2"))
    assert sorted(qwen2) == [QKV_BIAS.format(i) for i in range(2)]
    assert qwen2[QKV_BIAS.format(1)].hf == tuple(
        f"model.layers.1.self_attn.{p}_proj.bias" for p in "qkv")
    assert qwen2[QKV_BIAS.format(1)].kind == "qkv"
    assert biases(tiny("llama")) == biases(tiny("mistral")) == {}
    assert biases(tiny("llama", add_qkv_bias=True)) == {}  # Llama's HF layers have no place
    assert biases(tiny("qwen2", add_qkv_bias=False)) == {}


def test_qk_norm_rules_are_qwen3s():
    def norms(model: ModelConfig) -> dict:
        return {r.megatron: r for r in weight_rules(model) if "_layernorm." in r.megatron
                and "self_attention" in r.megatron}

    qwen3 = norms(tiny("qwen3"))
    assert sorted(qwen3) == [f"decoder.layers.{i}.self_attention.{q}_layernorm.weight"
                             for i in range(2) for q in "kq"]
    assert qwen3["decoder.layers.1.self_attention.q_layernorm.weight"].hf == (
        "model.layers.1.self_attn.q_norm.weight",)
    assert all(norms(tiny(name)) == {} for name in ("llama", "mistral", "qwen2", "mixtral"))
    assert sorted(norms(tiny("qwen3_moe"))) == sorted(qwen3)
    with pytest.raises(CheckpointError, match="^attention_bias on Qwen3 layers is not "
                                              "supported$"):
        model_config_from_hf({**hf_config_from_model(tiny("qwen3")), "attention_bias": True})


def test_mixtral_layers_are_experts():
    rules = {r.megatron: r for r in weight_rules(tiny("mixtral"))}
    layer = "decoder.layers.1.mlp."
    assert not any(name.startswith(layer + "linear_fc") for name in rules)  # no dense MLP
    assert rules[layer + "router.weight"].hf == ("model.layers.1.block_sparse_moe.gate.weight",)
    fc1 = rules[layer + "experts.local_experts.3.linear_fc1.weight"]
    assert fc1.kind == "fc1" and fc1.hf == tuple(
        f"model.layers.1.block_sparse_moe.experts.3.w{i}.weight" for i in (1, 3))
    assert sum(".local_experts." in name for name in rules) == 2 * 2 * 4  # layers x fc x experts
    with pytest.raises(CheckpointError, match="router_jitter_noise on Mixtral"):
        model_config_from_hf({**hf_config_from_model(tiny("mixtral")),
                              "router_jitter_noise": 0.1})


def test_qwen_moe_layers():
    qwen2 = {r.megatron: r for r in weight_rules(tiny("qwen2_moe"))}
    shared = "decoder.layers.0.mlp.shared_experts."
    assert qwen2[shared + "gate_weight"].hf == ("model.layers.0.mlp.shared_expert_gate.weight",)
    assert qwen2[shared + "linear_fc1.weight"].hf == (
        "model.layers.0.mlp.shared_expert.gate_proj.weight",
        "model.layers.0.mlp.shared_expert.up_proj.weight")
    assert QKV_BIAS.format(0) in qwen2
    qwen3 = {r.megatron for r in weight_rules(tiny("qwen3_moe"))}
    assert not any("shared_experts" in name for name in qwen3)
    assert "decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight" in qwen3
    hf = hf_config_from_model(tiny("qwen3_moe"))
    with pytest.raises(CheckpointError, match="dense layers between MoE layers"):
        model_config_from_hf({**hf, "mlp_only_layers": [1]})
