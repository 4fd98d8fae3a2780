"""Config loading, overrides and every validation error, with the message a user would see."""

from pathlib import Path

import pytest

from megatron_dvpo.config import (ConfigError, ModelConfig, ParallelConfig, RunConfig,
                                  load_config, save_config, validate)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "model:\n  num_layers: 8\n  hidden_size: 128\noptimizer:\n  lr: 1e-5\n")
    cfg = load_config(path, ["model.num_layers=4", "parallel.tensor_model_parallel_size=2",
                             "model.num_query_groups=null", "precision.params_dtype=bf16"])
    assert cfg.model.num_layers == 4 and cfg.model.hidden_size == 128
    assert cfg.optimizer.lr == pytest.approx(1e-5)  # PyYAML reads 1e-5 as a string
    assert cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.model.num_query_groups is None
    assert cfg.precision.params_dtype == "bf16"


def test_round_trip(tmp_path):
    cfg = load_config(EXAMPLES / "llama3.2_1b.yaml")
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


def test_unknown_key_names_closest(tmp_path):
    path = write(tmp_path, "model:\n  num_layer: 2\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'model.num_layer'.*"
                                          r"did you mean 'num_layers'"):
        load_config(path)


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'paralel'.*'parallel'"):
        load_config(write(tmp_path, "paralel:\n  tensor_model_parallel_size: 2\n"))


def test_unknown_override_key():
    with pytest.raises(ConfigError, match=r"'optimizer.learning_rate' in override"):
        load_config(None, ["optimizer.learning_rate=3"])
    with pytest.raises(ConfigError, match=r"'seed' is a value, not a section"):
        load_config(None, ["seed.x=3"])
    with pytest.raises(ConfigError, match=r"must look like section.key=value"):
        load_config(None, ["model.num_layers"])


@pytest.mark.parametrize("override, message", [
    ("model.num_layers=two", r"model.num_layers: expected an integer, got 'two'"),
    ("model.num_layers=2.5", r"model.num_layers: expected an integer"),
    ("model.tie_embeddings=maybe", r"model.tie_embeddings: expected true or false"),
    ("model.normalization=BatchNorm", r"model.normalization: 'BatchNorm' is not one of"),
    ("precision.fp8=e5m2", r"precision.fp8: 'e5m2' is not one of"),
    ("optimizer.lr=fast", r"optimizer.lr: expected a number, got 'fast'"),
])
def test_type_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def layout_cfg(world=8, **changes) -> tuple[RunConfig, int]:
    cfg = RunConfig(model=ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=8,
                                      num_query_groups=4, vocab_size=1000))
    for key, value in changes.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg, world


@pytest.mark.parametrize("changes, world, message", [
    ({"parallel__tensor_model_parallel_size": 3}, 6,
     r"num_attention_heads=8 is not divisible by parallel.tensor_model_parallel_size=3"),
    ({"parallel__tensor_model_parallel_size": 8}, 8,
     r"num_query_groups=4 is not divisible by parallel.tensor_model_parallel_size=8"),
    ({"model__num_query_groups": 3}, 8,
     r"num_attention_heads=8 is not divisible by model.num_query_groups=3"),
    ({"parallel__pipeline_model_parallel_size": 3}, 6,
     r"num_layers=4 is not divisible by parallel.pipeline_model_parallel_size=3"),
    ({"parallel__pipeline_model_parallel_size": 2,
      "parallel__virtual_pipeline_model_parallel_size": 4}, 8,
     r"num_layers=4 is not divisible by .*pipeline_model_parallel_size=2 x "
     r"virtual_pipeline_model_parallel_size=4"),
    ({"parallel__tensor_model_parallel_size": 2, "parallel__pipeline_model_parallel_size": 2},
     6, r"world size 6 is not divisible by .* = 4"),
    ({"parallel__virtual_pipeline_model_parallel_size": 2}, 8,
     r"needs pipeline_model_parallel_size >= 2"),
    ({"parallel__sequence_parallel": True}, 8, r"sequence_parallel=true needs"),
    # refused here, before any process group, not when attention is built
    ({"parallel__context_parallel_size": 2}, 8,
     r"parallel.context_parallel_size=2 is not supported: attention runs on SDPA"),
    ({"model__hidden_size": 60}, 8, r"hidden_size=60 is not divisible by "
                                    r"model.num_attention_heads=8; set model.kv_channels"),
    ({"model__ffn_hidden_size": 100, "parallel__tensor_model_parallel_size": 8,
      "model__num_query_groups": 8}, 8, r"ffn_hidden_size=100 is not divisible"),
    ({"model__vocab_size": 1001, "model__make_vocab_size_divisible_by": 1,
      "parallel__tensor_model_parallel_size": 2}, 8,
     r"padded vocab size 1001 .* not divisible by parallel.tensor_model_parallel_size=2"),
    ({"data__global_batch_size": 6, "parallel__tensor_model_parallel_size": 2}, 8,
     r"global_batch_size=6 is not divisible by data.micro_batch_size=1 x data-parallel size 4"),
    ({"data__seq_length": 1024}, 8, r"seq_length=1024 exceeds model.max_position_embeddings"),
])
def test_layout_errors(changes, world, message):
    cfg, world = layout_cfg(world, **changes)
    with pytest.raises(ConfigError, match=message):
        validate(cfg, world)


def test_valid_layouts():
    for tp, pp, world in ((1, 1, 1), (2, 1, 2), (2, 2, 8), (4, 4, 16)):
        cfg, _ = layout_cfg(world, parallel__tensor_model_parallel_size=tp,
                            parallel__pipeline_model_parallel_size=pp)
        validate(cfg, world)


def test_vocab_padding_is_independent_of_tp():
    model = ModelConfig(vocab_size=1000)
    assert model.padded_vocab_size == 1024
    assert ModelConfig(vocab_size=128256).padded_vocab_size == 128256
    assert ModelConfig(vocab_size=151936, make_vocab_size_divisible_by=1).padded_vocab_size \
        == 151936


@pytest.mark.parametrize("name, world", [("tiny.yaml", 2), ("llama3_8b.yaml", 16),
                                         ("llama3.2_1b.yaml", 8)])
def test_examples_validate(name, world):
    cfg = load_config(EXAMPLES / name)
    validate(cfg, world)


def test_example_shapes():
    llama8b = load_config(EXAMPLES / "llama3_8b.yaml").model
    assert (llama8b.num_layers, llama8b.hidden_size, llama8b.num_query_groups,
            llama8b.ffn_hidden_size, llama8b.vocab_size) == (32, 4096, 8, 14336, 128256)
    llama1b = load_config(EXAMPLES / "llama3.2_1b.yaml").model
    assert llama1b.tie_embeddings and llama1b.rope_scaling_factor == 32.0


def test_parallel_config_defaults_are_single_rank():
    parallel = ParallelConfig()
    assert parallel.tensor_model_parallel_size == parallel.pipeline_model_parallel_size == 1


@pytest.mark.parametrize("override, message", [
    ("data.micro_batch_size=0", r"data.micro_batch_size must be > 0, got 0"),
    ("optimizer.lr=0", r"optimizer.lr must be > 0, got 0.0"),
    ("optimizer.lr=-1e-5", r"optimizer.lr must be > 0"),
    ("train_steps=0", r"train_steps must be > 0, got 0"),
    ("logging.log_interval=0", r"logging.log_interval must be > 0, got 0"),
    ("rollout.top_p=0", r"rollout.top_p must be in \(0, 1\], got 0.0"),
    ("rl.lam=1.5", r"rl.lam must be in \[0, 1\], got 1.5"),
    ("rl.kl_coef=-0.1", r"rl.kl_coef must be >= 0"),
])
def test_impossible_values_are_rejected_on_load(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
    key, value = override.split("=")
    section, name = key.split(".") if "." in key else (None, key)
    text = f"{section}:\n  {name}: {value}\n" if section else f"{name}: {value}\n"
    with pytest.raises(ConfigError, match=message):  # the same from a YAML file
        load_config(write(tmp_path, text))


def test_a_bad_command_line_value_is_blamed_on_the_command_line(tmp_path):
    path = write(tmp_path, "model:\n  num_layers: 2\n")
    with pytest.raises(ConfigError) as error:
        load_config(path, ["model.num_layers=two"])
    message = str(error.value)
    assert message.startswith("command line 'model.num_layers=two': model.num_layers: expected "
                              "an integer"), message
    assert str(path) not in message
    with pytest.raises(ConfigError, match=rf"^{path}: model.num_layers: expected an integer"):
        load_config(write(tmp_path, "model:\n  num_layers: two\n"))
