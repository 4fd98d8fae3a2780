"""Precision routing on CPU: which layer implementation and FP8 recipe a config gets on a given
machine, which errors fire, and that FP8's sequence alignment leaves results unchanged.

Machines are described with ``Hardware`` (what ``Hardware.detect()`` reads on a real one); the
FP8 path itself runs in tests/gpu.
"""

import dataclasses

import pytest
import torch

from megatron_dvpo.config import ConfigError, load_config
from megatron_dvpo.models.precision import (Hardware, fp8_disabled, inference_precision,
                                            plan_precision)

CPU = Hardware()
A100 = Hardware(cuda=True, capability=(8, 0), te_version="2.8.0")
H100 = Hardware(cuda=True, capability=(9, 0), te_version="2.8.0+cu12",
                block_scaling=(True, ""))
L40S_OLD_TE = Hardware(cuda=True, capability=(8, 9), te_version="2.1.0")
H100_NO_TE = Hardware(cuda=True, capability=(9, 0))


def config(*overrides):
    return load_config(None, ["model.num_layers=8", "model.hidden_size=256",
                              "model.ffn_hidden_size=704", "model.num_attention_heads=8",
                              "precision.params_dtype=bf16", *overrides])


def plan(hw, *overrides, model=True):
    cfg = config(*overrides)
    return plan_precision(cfg.precision, cfg.parallel, cfg.model if model else None, hw)


@pytest.mark.parametrize("impl, hw, use_te", [
    ("auto", CPU, False), ("auto", H100_NO_TE, False), ("auto", H100, True),
    ("local", H100, False), ("transformer_engine", H100, True),
])
def test_layer_implementation(impl, hw, use_te):
    got = plan(hw, f"precision.transformer_impl={impl}")
    assert got.use_te is use_te and got.fp8 is None
    assert got.transformer_config_kwargs() == {}


@pytest.mark.parametrize("hw, message", [
    (CPU, "this machine has no CUDA GPU"),
    (H100_NO_TE, "transformer_engine is not installed"),
])
def test_transformer_engine_unavailable_is_an_error(hw, message):
    with pytest.raises(ConfigError, match=f"transformer_impl=transformer_engine needs .*{message}"):
        plan(hw, "precision.transformer_impl=transformer_engine")


@pytest.mark.parametrize("fmt", ["hybrid", "e4m3"])
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise"])
def test_fp8_on_hopper(fmt, recipe):
    got = plan(H100, f"precision.fp8={fmt}", f"precision.fp8_recipe={recipe}")
    assert got.use_te and (got.fp8, got.fp8_recipe) == (fmt, recipe)
    kwargs = got.transformer_config_kwargs()
    assert kwargs["fp8"] == fmt and kwargs["fp8_recipe"] == recipe
    assert kwargs["first_last_layers_bf16"] is False and kwargs["fp8_param"] is False
    assert f"FP8 {fmt} with {recipe} scaling" in got.describe()


def test_first_and_last_layers_in_bf16_reach_megatron():
    """megatron's own per-layer decision (``is_first_last_bf16_layer``) sees our counts."""
    from megatron.core.fp8_utils import is_first_last_bf16_layer

    from megatron_dvpo.models.gpt import transformer_config

    cfg = config("precision.fp8=hybrid", "precision.fp8_recipe=tensorwise",
                 "precision.num_layers_at_start_in_bf16=1",
                 "precision.num_layers_at_end_in_bf16=2",
                 "parallel.use_distributed_optimizer=true", "precision.fp8_param_gather=true")
    got = plan_precision(cfg.precision, cfg.parallel, cfg.model, H100)
    assert "first 1 and last 2 layers in bf16, FP8 parameters gathered" in got.describe()
    tc = transformer_config(cfg.model, cfg.parallel, cfg.precision, got, initialize=False)
    assert (tc.fp8, tc.fp8_recipe, tc.fp8_param) == ("hybrid", "tensorwise", True)
    bf16 = [is_first_last_bf16_layer(tc, layer) for layer in range(8)]
    assert bf16 == [True, False, False, False, False, False, True, True]


def test_delayed_scaling_history():
    tc_kwargs = plan(H100, "precision.fp8=hybrid", "precision.fp8_amax_history_len=16",
                     "precision.fp8_amax_compute_algo=most_recent").transformer_config_kwargs()
    assert (tc_kwargs["fp8_amax_history_len"], tc_kwargs["fp8_amax_compute_algo"]) == \
        (16, "most_recent")


@pytest.mark.parametrize("hw, overrides, message", [
    (CPU, [], "needs FP8 support on a CUDA GPU .* this machine has no CUDA GPU. FP8 never falls "
              "back to bf16 silently"),
    (H100, ["precision.transformer_impl=local"], "needs Transformer Engine layers, but "
                                                  "precision.transformer_impl=local"),
    (H100_NO_TE, [], "needs Transformer Engine .* which is not installed"),
    (A100, [], "compute capability 8.9 or newer .* this GPU is sm_80"),
    (L40S_OLD_TE, ["precision.fp8_recipe=tensorwise"], r"needs Transformer Engine >= 2.2; "
                                                       "installed: 2.1.0"),
    (L40S_OLD_TE, ["precision.fp8_recipe=blockwise"], r"needs Transformer Engine >= 2.3"),
    (dataclasses.replace(L40S_OLD_TE, te_version="2.8"), ["precision.fp8_recipe=blockwise"],
     r"needs a Hopper GPU \(sm_90\); this GPU is sm_89"),
    (dataclasses.replace(H100, block_scaling=(False, "CUDA 12.9+ required")),
     ["precision.fp8_recipe=blockwise"], r"blockwise scaling cannot run here \(CUDA 12.9\+"),
    (H100, ["precision.params_dtype=fp32"], "set precision.params_dtype=bf16"),
    (H100, ["precision.num_layers_at_start_in_bf16=1"],
     "fp8_recipe=delayed cannot keep first/last layers in bf16"),
    (H100, ["precision.fp8_recipe=tensorwise", "parallel.pipeline_model_parallel_size=4",
            "precision.num_layers_at_end_in_bf16=3"],
     "num_layers_at_end_in_bf16=3 exceeds the 2 layers of a pipeline stage"),
    (H100, ["precision.fp8_recipe=tensorwise", "precision.num_layers_at_start_in_bf16=4",
            "precision.num_layers_at_end_in_bf16=4"], "leave none of the 8 layers in FP8"),
    (H100, ["precision.fp8_recipe=tensorwise", "precision.num_layers_at_start_in_bf16=-1"],
     "must be >= 0"),
    (H100, ["precision.fp8_param_gather=true"], "set parallel.use_distributed_optimizer=true"),
    (H100, ["model.hidden_size=200", "model.kv_channels=25"],
     "divisible by 16: model.hidden_size = 200"),
    (H100, ["parallel.tensor_model_parallel_size=8"],
     "model.ffn_hidden_size / tensor_model_parallel_size = 88"),
])
def test_fp8_errors(hw, overrides, message):
    with pytest.raises(ConfigError, match=message):
        plan(hw, "precision.fp8=hybrid", *overrides)


@pytest.mark.parametrize("key", ["num_layers_at_start_in_bf16=1", "fp8_param_gather=true"])
def test_fp8_options_without_fp8_are_errors(key):
    with pytest.raises(ConfigError, match="only applies to FP8 training"):
        plan(H100, f"precision.{key}")


def test_hardware_is_checked_before_the_model_is_known():
    """A DVPO job checks its precision before reading the policy's config."""
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        plan(CPU, "precision.fp8=e4m3", model=False)
    assert plan(H100, "precision.fp8=e4m3", model=False).fp8 == "e4m3"


def test_this_machine_refuses_fp8_before_any_process_group(tmp_path, capsys):
    """The command line fails at once, before torch.distributed or a model exists, with one
    ``error:`` line and exit status 2."""
    import re

    from megatron_dvpo.gvm.train import main

    if torch.cuda.is_available():
        pytest.skip("checks the CPU refusal")
    with pytest.raises(SystemExit) as exit_status:
        main(["--config", "examples/gvm_tiny.yaml", "precision.fp8=hybrid",
              "precision.params_dtype=bf16"])
    assert exit_status.value.code == 2
    assert re.search(r"^error: .*precision.fp8=hybrid .* no CUDA GPU", capsys.readouterr().err,
                     re.MULTILINE)
    assert not torch.distributed.is_initialized()


def test_frozen_models_run_without_fp8():
    cfg = config("precision.fp8=hybrid", "precision.fp8_recipe=blockwise",
                 "precision.num_layers_at_start_in_bf16=1",
                 "parallel.use_distributed_optimizer=true", "precision.fp8_param_gather=true")
    frozen = inference_precision(cfg.precision)
    got = plan_precision(frozen, cfg.parallel, cfg.model, H100)
    assert got.fp8 is None and got.use_te and frozen.params_dtype == "bf16"
    assert cfg.precision.fp8 == "hybrid"  # the policy's own config is untouched


def test_generation_runs_with_fp8_switched_off(single_rank):
    from megatron_dvpo.models.gpt import build_model_chunks

    chunks = build_model_chunks(load_config(None, ["model.num_layers=2", "model.vocab_size=100"]))
    chunks[0].config.fp8 = "hybrid"
    with fp8_disabled(chunks):
        assert chunks[0].config.fp8 is None
        assert chunks[0].decoder.layers[0].config.fp8 is None  # one config for every layer
    assert chunks[0].config.fp8 == "hybrid"
    with pytest.raises(RuntimeError), fp8_disabled(chunks):
        raise RuntimeError
    assert chunks[0].config.fp8 == "hybrid"


def test_fp8_sequence_alignment_changes_nothing(single_rank):
    """FP8 pads each microbatch to a multiple of 16 tokens; outputs equal the unpadded run.

    The model is a CPU one whose config says FP8 (without TE, megatron's FP8 context is a no-op),
    so only the padding differs between the two runs.
    """
    from megatron_dvpo.models import forward
    from megatron_dvpo.models.gpt import build_model_chunks
    from megatron_dvpo.models.gvm import build_gvm_chunks

    cfg = load_config(None, ["model.num_layers=2", "model.vocab_size=100"])
    policy = build_model_chunks(cfg)
    gvm = build_gvm_chunks(cfg, value_head_init_std=0.02)
    torch.manual_seed(0)
    tokens = torch.randint(0, 100, (4, 11))
    pad = torch.zeros(4, 1, 1, 11, dtype=torch.bool)
    pad[1, ..., :3] = True  # a left-padded row
    batches = forward.make_microbatches(2, tokens=tokens, attention_mask=pad.expand(-1, -1, 11, -1))

    def run():
        return (forward.token_logprobs(policy, batches, 100), forward.token_values(gvm, batches))

    plain = run()
    assert forward.sequence_multiple(policy) == 1
    for model in (policy, gvm):
        model[0].config.fp8 = "hybrid"
    assert forward.sequence_multiple(policy) == 16
    aligned = run()
    for got, expected in zip(aligned, plain):
        assert got.shape == expected.shape
        # the left padding's own positions are junk either way (nothing reads them)
        real = ~pad[:, 0, 0, :got.shape[1]]
        torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)


def test_model_inputs_padding():
    from megatron_dvpo.models.forward import model_inputs

    tokens = torch.arange(10).view(2, 5)
    mask = torch.zeros(2, 1, 5, 5, dtype=torch.bool)
    mask[0, ..., 0] = True
    padded, positions, padded_mask = model_inputs({"tokens": tokens, "attention_mask": mask}, 16)
    assert padded.shape == (2, 16) and torch.equal(padded[:, :5], tokens)
    assert torch.equal(positions[0], torch.arange(16))
    assert padded_mask.shape == (2, 1, 16, 16)
    assert torch.equal(padded_mask[..., :5, :5], mask) and not padded_mask[..., 5:].any()
    _, _, key_mask = model_inputs({"tokens": tokens, "attention_mask": mask[:, :, :1]}, 16)
    assert key_mask.shape == (2, 1, 1, 16)


def test_fp8_example_plans_on_hopper_with_the_1b_policy():
    from megatron_dvpo.config import validate

    cfg = load_config("examples/llama3.2_1b_dvpo_fp8.yaml")
    cfg.model = load_config("examples/llama3.2_1b.yaml").model  # what rl.policy would hold
    validate(cfg, 8)
    got = plan_precision(cfg.precision, cfg.parallel, cfg.model, H100)
    assert (got.fp8, got.fp8_recipe, got.fp8_param_gather) == ("hybrid", "tensorwise", True)
    assert (got.bf16_layers_at_start, got.bf16_layers_at_end) == (1, 1)
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        plan_precision(cfg.precision, cfg.parallel, cfg.model, CPU)


@pytest.mark.parametrize("module", ["transformer_engine.pytorch.quantization",
                                    "transformer_engine.pytorch.fp8"])
def test_te_block_scaling_verdict_is_found_where_each_te_keeps_it(module, monkeypatch):
    import sys
    import types

    from megatron_dvpo.models.precision import _te_block_scaling_verdict

    fake = types.ModuleType(module)
    fake.check_fp8_block_scaling_support = lambda: (False, "CUDA 12.4 < 12.9")
    for name in ("transformer_engine", "transformer_engine.pytorch",
                 "transformer_engine.pytorch.quantization", "transformer_engine.pytorch.fp8"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module, fake)
    assert _te_block_scaling_verdict() == (False, "CUDA 12.4 < 12.9")


def test_left_padded_rows_moved_right_equal_the_dense_padding_mask(single_rank):
    """Rollout rows (left-padded) run plain causal attention, padding moved to their ends and
    the head's input moved back: log-probs (full and lean head), values and gradients equal the
    dense [s, s] padding-mask path to 1e-5 in fp32."""
    from megatron_dvpo.models import forward
    from megatron_dvpo.models.gpt import build_model_chunks
    from megatron_dvpo.models.gvm import build_gvm_chunks

    cfg = load_config(None, ["model.num_layers=2", "model.vocab_size=100"])
    policy = build_model_chunks(cfg)
    gvm = build_gvm_chunks(cfg, value_head_init_std=0.02)
    torch.manual_seed(0)
    tokens = torch.randint(0, 100, (4, 13))
    left_pad = torch.tensor([0, 3, 5, 1])
    real = torch.arange(13)[None, :] >= left_pad[:, None]
    weight = real[:, :-1].float()  # real positions predicting real tokens, as RL reads
    dense = forward.make_microbatches(2, tokens=tokens, weight=weight,
                                      attention_mask=forward.padding_mask(left_pad, 13))
    moved = forward.make_microbatches(2, tokens=tokens, weight=weight, left_pad=left_pad)
    assert torch.equal(forward.move_padding_right(tokens, left_pad)[1, :10], tokens[1, 3:])

    def loss(out, mb):
        lp = out["logprobs"]
        return (lp ** 2 * mb["weight"][:, -lp.shape[1]:]).sum(), {"logprobs": lp.detach()}

    def run(batches, start=0):
        head = forward.policy_logprobs_head(100, start=start, chunk=4 if start else 0)
        for chunk in policy:
            chunk.zero_grad()
        outputs = forward.run_microbatches(policy, batches, head, loss)
        grads = torch.cat([p.grad.flatten() for p in policy[0].parameters()])
        return (forward.concat_outputs(outputs, "logprobs"), grads,
                forward.token_values(gvm, batches))

    for start in (0, 6):  # every position, and the response's only (the lean head)
        (dense_lp, dense_grad, dense_values), (lp, grad, values) = (run(dense, start),
                                                                   run(moved, start))
        scored = real[:, start:-1]
        assert lp.shape == scored.shape
        torch.testing.assert_close(lp[scored], dense_lp[scored], atol=1e-5, rtol=0)
        torch.testing.assert_close(values[real], dense_values[real], atol=1e-5, rtol=0)
        torch.testing.assert_close(grad, dense_grad, atol=1e-5, rtol=1e-4)
