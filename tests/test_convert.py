"""HF <-> megatron conversion: exact logits, exact round trips, value heads, and every error."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_models
from conftest import REPO, launch
from megatron_dvpo.conversion.convert import export_hf, import_hf
from megatron_dvpo.conversion.families import FAMILIES
from megatron_dvpo.conversion.safetensors_io import CheckpointError

CONVERT = [sys.executable, str(REPO / "tools" / "convert_hf_to_megatron.py")]
LOGIT_TOL = 1e-4  # fp32


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {kind: hf_models.build(kind, root / kind, seed=i)
            for i, kind in enumerate(FAMILIES)}


@pytest.fixture(scope="module")
def converted(hf_dirs, tmp_path_factory):
    """Each model converted by the command-line tool, as a user would."""
    root = tmp_path_factory.mktemp("megatron")
    out = {}
    for kind, hf_dir in hf_dirs.items():
        out[kind] = root / kind
        proc = subprocess.run([*CONVERT, "--hf", str(hf_dir), "--out", str(out[kind]),
                               "--tp", "2"], capture_output=True, text=True, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "converting" in proc.stdout and "MiB/s" in proc.stdout  # progress is shown
    return out


def read_hf_state(directory: Path) -> dict:
    state = {}
    for path in sorted(directory.glob("*.safetensors")):
        state.update(load_file(path))
    return state


@pytest.mark.multirank
def test_logits_match_hf_at_tp1_tp2_pp2(hf_dirs, converted, tmp_path):
    specs = [f"{hf_dirs['llama']}:{converted['llama']}:tp1pp1,tp2pp1,tp1pp2",
             f"{hf_dirs['mistral']}:{converted['mistral']}:tp1pp1,tp2pp1",
             f"{hf_dirs['qwen2']}:{converted['qwen2']}:tp1pp1,tp2pp1,tp1pp2",
             f"{hf_dirs['qwen3']}:{converted['qwen3']}:tp1pp1,tp2pp1,tp1pp2",
             f"{hf_dirs['mixtral']}:{converted['mixtral']}:tp1pp1,tp2pp1,tp1pp1ep2",
             f"{hf_dirs['qwen2_moe']}:{converted['qwen2_moe']}:tp1pp1,tp2pp1",
             f"{hf_dirs['qwen3_moe']}:{converted['qwen3_moe']}:tp1pp1,tp1pp1ep2"]
    out = tmp_path / "logits.json"
    launch([str(REPO / "tests" / "distributed" / "hf_logits.py"), str(out), *specs], nproc=2)
    diffs = json.loads(out.read_text())
    for kind in FAMILIES:
        for layout, diff in diffs[kind].items():
            assert 0.0 <= diff <= LOGIT_TOL, f"{kind} {layout}: max |logit diff| = {diff}"


@pytest.mark.compat
@pytest.mark.parametrize("kind", list(FAMILIES))
def test_round_trip_is_identical(kind, hf_dirs, converted, tmp_path, single_rank):
    back = export_hf(converted[kind], tmp_path / "hf", verbose=False)
    original, exported = read_hf_state(hf_dirs[kind]), read_hf_state(back)
    assert sorted(original) == sorted(exported)
    for key, tensor in original.items():
        assert torch.equal(tensor, exported[key]), key
    config = json.loads((back / "config.json").read_text())
    assert config["tie_word_embeddings"] == (kind == "qwen2")
    assert ("lm_head.weight" in exported) == (kind != "qwen2")  # tied stays tied
    hf_models.load(back)  # transformers loads it


def test_streamed_save_holds_one_parameter(hf_dirs, tmp_path, single_rank):
    """torch DCP's writer keeps every tensor it wrote until the save ends (one per checkpoint
    key): each handed-out tensor must be emptied by the time the next parameter is built, and
    what was written must still be the data."""
    from megatron.core import dist_checkpointing

    from megatron_dvpo.checkpointing import model_sharded_state_dict
    from megatron_dvpo.config import load_config
    from megatron_dvpo.conversion.convert import _skeleton
    from megatron_dvpo.conversion.mapping import stacked_index
    from megatron_dvpo.conversion.streaming import (OnDemandParameters, OnDemandSaveStrategy,
                                                    read_layer)

    model = load_config(import_hf(hf_dirs["mixtral"], tmp_path / "ref", verbose=False)
                        / "config.yaml").model
    chunk, _ = _skeleton(model, load_config(tmp_path / "ref" / "config.yaml").precision)
    params = dict(chunk.named_parameters())
    from torch.multiprocessing.reductions import StorageWeakRef

    built, leftover = {}, []  # weak references to the storages: the writer keeps its own views

    def resident(ref: StorageWeakRef) -> int:
        return 0 if ref.expired() else \
            torch.UntypedStorage._new_with_weak_ptr(ref.cdata).nbytes()

    def build(name: str) -> torch.Tensor:
        leftover.append(sum(resident(ref) for ref in built.values()))
        full = torch.full_like(params[name], float(len(built) + 1))
        built[name] = StorageWeakRef(full.untyped_storage())
        return full

    (tmp_path / "out").mkdir()
    dist_checkpointing.save(model_sharded_state_dict([chunk]), str(tmp_path / "out"),
                            sharded_strategy=OnDemandSaveStrategy(
                                OnDemandParameters(params, build)))
    assert len(built) == len(params) and leftover == [0] * len(params)
    keys = model_sharded_state_dict([chunk])["model"]
    for i, name in enumerate(built):
        stored = read_layer(tmp_path / "out", keys[name].key, stacked_index(name))
        assert torch.equal(stored, torch.full_like(stored, float(i + 1))), name


def test_converted_config_records_layout_and_shape(converted):
    from megatron_dvpo.config import load_config

    cfg = load_config(converted["llama"] / "config.yaml")
    assert cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.model.rope_scaling_factor == 8.0
    assert cfg.model.rope_scaling_original_max_position == 32
    assert cfg.model.num_query_groups == 2 and not cfg.model.tie_embeddings
    mistral = load_config(converted["mistral"] / "config.yaml").model
    assert mistral.vocab_size == 1001 and mistral.padded_vocab_size == 1024
    qwen = load_config(converted["qwen2"] / "config.yaml").model
    assert qwen.add_qkv_bias and qwen.tie_embeddings
    qwen3 = load_config(converted["qwen3"] / "config.yaml").model
    assert qwen3.qk_layernorm and qwen3.kv_channels == 32 and not qwen3.add_qkv_bias
    mixtral = load_config(converted["mixtral"] / "config.yaml").model
    assert (mixtral.num_experts, mixtral.moe_router_topk) == (4, 2)
    qwen2_moe = load_config(converted["qwen2_moe"] / "config.yaml").model
    assert qwen2_moe.moe_shared_expert_intermediate_size == 48 and qwen2_moe.moe_router_pre_softmax
    qwen3_moe = load_config(converted["qwen3_moe"] / "config.yaml").model
    assert qwen3_moe.qk_layernorm and not qwen3_moe.moe_router_pre_softmax


def gvm_values(ckpt: Path, tokens: torch.Tensor) -> torch.Tensor:
    from megatron_dvpo.checkpointing import load_model
    from megatron_dvpo.config import load_config
    from megatron_dvpo.models import build_chunks, forward

    cfg = load_config(ckpt / "config.yaml")
    cfg.parallel.tensor_model_parallel_size = 1
    assert cfg.model.value_head
    chunks = build_chunks(cfg, initialize=False)
    load_model(chunks, ckpt / "model")
    return forward.token_values(chunks, forward.make_microbatches(2, tokens=tokens))


def trunk_hidden(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    import transformers as tf

    with torch.no_grad():
        return tf.AutoModel.from_pretrained(hf_dir).eval()(tokens).last_hidden_state


def test_gvm_from_trl_value_head(hf_dirs, tmp_path, single_rank):
    """A TRL AutoModelForCausalLMWithValueHead checkpoint: trunk + lm_head + v_head.summary.*"""
    trl = tmp_path / "trl"
    hf_models.build("llama", trl, seed=5)
    state = load_file(trl / "model.safetensors")
    g = torch.Generator().manual_seed(9)
    head_w, head_b = torch.randn(1, 64, generator=g) * 0.1, torch.tensor([0.7])
    state.update({"v_head.summary.weight": head_w, "v_head.summary.bias": head_b})
    save_file(state, trl / "model.safetensors", metadata={"format": "pt"})

    ckpt = import_hf(trl, tmp_path / "gvm", target="gvm", verbose=False)
    assert json.loads((ckpt / "conversion.json").read_text())["value_head_source"] == [
        "v_head.summary.weight", "v_head.summary.bias"]
    tokens = torch.randint(0, 1000, (4, 12), generator=g)
    expected = trunk_hidden(trl, tokens) @ head_w.T + head_b  # TRL's ValueHead on the last state
    values = gvm_values(ckpt, tokens)
    assert (values - expected.squeeze(-1)).abs().max() < 1e-5

    back = export_hf(ckpt, tmp_path / "gvm_hf", verbose=False)
    exported = read_hf_state(back)
    assert torch.equal(exported["v_head.summary.weight"], head_w)
    assert torch.equal(exported["v_head.summary.bias"], head_b)
    assert "lm_head.weight" not in exported
    again = import_hf(back, tmp_path / "gvm_again", target="gvm", verbose=False)
    assert torch.equal(gvm_values(again, tokens), values)


def test_gvm_from_sequence_classification_score(tmp_path, single_rank):
    cls = hf_models.build("llama_cls", tmp_path / "rm", seed=3)
    score = load_file(cls / "model.safetensors")["score.weight"]
    ckpt = import_hf(cls, tmp_path / "gvm", target="gvm", verbose=False)
    tokens = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(1))
    expected = (trunk_hidden(cls, tokens) @ score.T).squeeze(-1)
    assert (gvm_values(ckpt, tokens) - expected).abs().max() < 1e-5


def test_gvm_from_policy_has_zero_head(hf_dirs, tmp_path, single_rank):
    ckpt = import_hf(hf_dirs["qwen2"], tmp_path / "gvm", target="gvm", verbose=False)
    values = gvm_values(ckpt, torch.randint(0, 1000, (2, 8)))
    assert torch.count_nonzero(values) == 0


# --- errors: clear, and nothing written under the output name --------------------------------


def expect_error(hf_dir: Path, out: Path, match: str, **kwargs):
    with pytest.raises(CheckpointError, match=match):
        import_hf(hf_dir, out, verbose=False, **kwargs)
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def test_unsupported_architecture(tmp_path):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps(
        {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    expect_error(tmp_path / "gpt2", tmp_path / "out",
                 r"unsupported architecture \['GPT2LMHeadModel'\]; supported: LlamaForCausalLM, "
                 r"MistralForCausalLM, Qwen2ForCausalLM")


def test_missing_shard(tmp_path):
    import transformers as tf

    model = tf.LlamaForCausalLM(tf.LlamaConfig(**hf_models.COMMON, vocab_size=1000))
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    expect_error(tmp_path / "sharded", tmp_path / "out",
                 rf"lists shards that are missing: \['{shards[1].name}'\]")


def rewrite(hf_dir: Path, drop=(), add=None):
    state = load_file(hf_dir / "model.safetensors")
    for key in drop:
        del state[key]
    state.update(add or {})
    save_file(state, hf_dir / "model.safetensors", metadata={"format": "pt"})


def test_missing_and_leftover_keys(tmp_path):
    broken = hf_models.build("llama", tmp_path / "missing")
    rewrite(broken, drop=["model.layers.1.mlp.up_proj.weight"])
    expect_error(broken, tmp_path / "out",
                 r"lacks 1 tensors: \['model.layers.1.mlp.up_proj.weight'\]")
    extra = hf_models.build("llama", tmp_path / "extra")
    rewrite(extra, add={"model.extra_adapter.weight": torch.zeros(2, 2)})
    expect_error(extra, tmp_path / "out", r"would drop: \['model.extra_adapter.weight'\]")
    rewrite(extra, drop=["model.extra_adapter.weight"],
            add={"v_head.summary.weight": torch.zeros(1, 64)})
    expect_error(extra, tmp_path / "out", r"would drop: \['v_head.summary.weight'\].*--target gvm")


def test_layout_must_divide_the_model(hf_dirs, tmp_path):
    from megatron_dvpo.config import ConfigError

    with pytest.raises(ConfigError, match=r"num_attention_heads=4 is not divisible by "
                                          r"parallel.tensor_model_parallel_size=3"):
        import_hf(hf_dirs["llama"], tmp_path / "out", tp=3, verbose=False)
    with pytest.raises(ConfigError, match=r"num_layers=2 is not divisible by "
                                          r"parallel.pipeline_model_parallel_size=4"):
        import_hf(hf_dirs["llama"], tmp_path / "out", pp=4, verbose=False)
    assert not (tmp_path / "out").exists()


def test_refuses_to_overwrite(hf_dirs, converted, tmp_path):
    target = tmp_path / "existing"
    target.mkdir()
    for item in ("model", "config.yaml", "conversion.json"):
        src = converted["llama"] / item
        (target / item).symlink_to(src, target_is_directory=src.is_dir())
    with pytest.raises(CheckpointError, match="already holds a checkpoint; pass --overwrite"):
        import_hf(hf_dirs["llama"], target, verbose=False)
    proc = subprocess.run([*CONVERT, "--hf", str(hf_dirs["llama"]), "--out", str(target)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "error:" in proc.stderr and "--overwrite" in proc.stderr


def test_truncated_weights_leave_nothing_behind(tmp_path, single_rank):
    broken = hf_models.build("llama", tmp_path / "truncated")
    path = broken / "model.safetensors"
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    path.write_bytes(data[:8 + header_len + (len(data) - 8 - header_len) // 2])
    expect_error(broken, tmp_path / "out", "is truncated")


def test_never_deletes_what_it_did_not_write(hf_dirs, converted, tmp_path, single_rank):
    """A non-empty --out that is not our output is refused with or without --overwrite, and a
    file named as --out is refused; nothing of the user's changes, and no .partial is left."""
    mine = tmp_path / "my_project"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(CheckpointError, match=r"is not empty and was not written by this "
                                                  r"converter"):
            import_hf(hf_dirs["llama"], mine, overwrite=overwrite, verbose=False)
        with pytest.raises(CheckpointError, match=r"is not empty and was not written"):
            export_hf(converted["llama"], mine, overwrite=overwrite, verbose=False)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert (mine / "notes.txt").read_text() == "keep me"
    a_file = tmp_path / "a_file"
    a_file.write_text("data")
    proc = subprocess.run([*CONVERT, "--hf", str(hf_dirs["llama"]), "--out", str(a_file)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and f"--out {a_file} is a file" in proc.stderr, proc.stderr
    assert a_file.read_text() == "data"
    assert not list(tmp_path.glob("*.partial"))
    # a staging directory somebody else made is not ours to remove either
    foreign = tmp_path / "out.partial"
    foreign.mkdir()
    (foreign / "x").write_text("x")
    with pytest.raises(CheckpointError, match=r"out.partial exists and was not made by"):
        import_hf(hf_dirs["llama"], tmp_path / "out", verbose=False)
    assert (foreign / "x").is_file()


def test_overwrite_replaces_its_own_output(hf_dirs, tmp_path, single_rank):
    out = import_hf(hf_dirs["llama"], tmp_path / "ckpt", verbose=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    export_hf(out, empty, verbose=False)  # an empty directory is fine
    export_hf(out, empty, overwrite=True, verbose=False)
    import_hf(hf_dirs["llama"], out, overwrite=True, verbose=False)
    assert (out / "conversion.json").is_file() and (empty / "conversion.json").is_file()
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob("*.replaced"))


def test_corrupt_header_or_config_names_the_file(tmp_path):
    broken = hf_models.build("llama", tmp_path / "corrupt")
    weights = broken / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:9] = b"#"  # the header's opening brace
    weights.write_bytes(bytes(data))
    expect_error(broken, tmp_path / "out", rf"{weights}: corrupt safetensors header")
    weights.write_bytes(struct.pack("<Q", 10 ** 12) + bytes(data[8:]))
    expect_error(broken, tmp_path / "out", rf"{weights}: corrupt safetensors header \(it claims")
    config = broken / "config.json"
    config.write_text('{"architectures": ["LlamaForCausalLM"],')
    expect_error(broken, tmp_path / "out", rf"{config}: invalid HF config \(not valid JSON")
    config.write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": 64}')
    expect_error(broken, tmp_path / "out", rf"{config}: missing keys \['num_hidden_layers'")


@pytest.mark.parametrize("flag", ["--tp", "--pp", "--ep"])
def test_parallel_sizes_must_be_positive(hf_dirs, tmp_path, flag):
    for size in ("0", "-2"):
        proc = subprocess.run([*CONVERT, "--hf", str(hf_dirs["llama"]), "--out",
                               str(tmp_path / "out"), flag, size], capture_output=True,
                              text=True, cwd=REPO)
        assert proc.returncode == 2 and f"error: {flag} must be >= 1, got {size}" in proc.stderr
        assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_expert_parallel_size_is_recorded_and_checked(hf_dirs, tmp_path, single_rank):
    from megatron_dvpo.config import load_config

    out = import_hf(hf_dirs["mixtral"], tmp_path / "mixtral", ep=2, verbose=False)
    assert load_config(out / "config.yaml").parallel.expert_model_parallel_size == 2
    proc = subprocess.run([*CONVERT, "--hf", str(hf_dirs["llama"]), "--out",
                           str(tmp_path / "llama"), "--ep", "2"], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert ("error: parallel.expert_model_parallel_size=2 needs a mixture-of-experts model"
            in proc.stderr)
    assert not (tmp_path / "llama").exists()


def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    """An HF directory whose tokenizer has more tokens than the embedding has rows."""
    from megatron_dvpo.data.tokenizer import TokenizerError, export_hf_tokenizer

    hf_dir = hf_models.build("llama", tmp_path / "small_vocab")
    config = json.loads((hf_dir / "config.json").read_text())
    model_vocab = config["vocab_size"]
    assert model_vocab < 2000
    text = tmp_path / "big.txt"
    text.write_text("\n".join(f"w{i} w{i * 3} x{i % 97}" for i in range(20000)))
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "big"),
                                   vocab_size=model_vocab + 200, model_type="bpe", pad_id=0,
                                   unk_id=1, bos_id=2, eos_id=3, minloglevel=2)
    export_hf_tokenizer(tmp_path / "big.model", hf_dir)
    with pytest.raises(TokenizerError, match=rf"has {model_vocab + 200} tokens but "
                                             rf".*config.json has model.vocab_size={model_vocab}"):
        import_hf(hf_dir, tmp_path / "out", verbose=False)
    assert not (tmp_path / "out").exists()


# --- the Transformer Engine layer spec: names and _extra_state --------------------------------


def test_te_names_are_megatrons_own():
    """Our local -> TE renames are exactly the keys map megatron-core's local spec writes dist
    checkpoints with, and its TE spec fuses the input norm into linear_qkv (read from its
    source: the TE spec cannot be built without Transformer Engine)."""
    import inspect

    from megatron.core.models.gpt import gpt_layer_specs

    from megatron_dvpo.conversion.mapping import TE_NAMES

    local = gpt_layer_specs.get_gpt_layer_local_spec()
    assert local.submodules.sharded_state_dict_keys_map == TE_NAMES
    source = inspect.getsource(gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec)
    assert "linear_qkv=backend.column_parallel_layer_norm_linear()" in source
    assert "pre_mlp_layernorm=backend.layer_norm() if num_experts else IdentityOp" in source


def test_te_rules_differ_only_in_the_fused_norm_names():
    from megatron_dvpo.conversion.mapping import weight_rules
    from megatron_dvpo.config import ModelConfig

    model = ModelConfig(num_layers=2, add_qkv_bias=True, hf_architecture="Qwen2ForCausalLM")
    local, te = weight_rules(model), weight_rules(model, spec="te")
    assert [(r.hf, r.kind) for r in local] == [(r.hf, r.kind) for r in te]
    renamed = {a.megatron: b.megatron for a, b in zip(local, te) if a.megatron != b.megatron}
    assert renamed == {
        f"decoder.layers.{i}.{old}weight": f"decoder.layers.{i}.{new}weight"
        for i in range(2) for old, new in (("input_layernorm.", "self_attention.linear_qkv."
                                            "layer_norm_"),
                                           ("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_"))}


def test_export_refuses_parameters_its_family_has_no_place_for(converted, tmp_path,
                                                               single_rank):
    """A qkv bias on a Llama, whose HF layers have none, fails the export, naming the
    parameters, instead of dropping them; nothing is written."""
    import shutil

    from megatron_dvpo.config import load_config, save_config

    ckpt = tmp_path / "biased"
    shutil.copytree(converted["llama"], ckpt)
    cfg = load_config(ckpt / "config.yaml")
    cfg.model.add_qkv_bias = True
    save_config(cfg, ckpt / "config.yaml")
    with pytest.raises(CheckpointError, match=r"LlamaForCausalLM has no HF tensors for megatron "
                                              r"parameters \['decoder.layers.0.self_attention"
                                              r".linear_qkv.bias'"):
        export_hf(ckpt, tmp_path / "hf", verbose=False)
    assert not list(tmp_path.glob("hf*"))


def test_checkpoints_hold_the_te_names(converted):
    """A local-spec (CPU) checkpoint stores its norms under the TE names, so a TE-spec model
    finds every weight it asks for; export reads the same keys from either."""
    from megatron.core.dist_checkpointing import load_tensors_metadata

    keys = set(load_tensors_metadata(str(converted["llama"] / "model")))
    assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in keys
    assert "decoder.layers.mlp.linear_fc1.layer_norm_weight" in keys
    assert not any("input_layernorm" in k or "pre_mlp_layernorm" in k for k in keys)


def test_te_extra_state_absent_from_a_checkpoint_is_skipped(converted, single_rank):
    """A model with a TE-like module (one carrying _extra_state, as TE's norms and linears do)
    loads a checkpoint made without it, keeping its fresh state; a checkpoint made with it
    loads into the plain model; a real weight the checkpoint lacks is still an error."""
    import torch

    from megatron_dvpo.checkpointing import load_model, save_model
    from megatron_dvpo.config import ConfigError, load_config
    from megatron_dvpo.models import build_chunks

    cfg = load_config(converted["llama"] / "config.yaml")
    cfg.parallel.tensor_model_parallel_size = 1

    def te_like(chunks):
        norm = chunks[0].decoder.final_layernorm

        class WithExtraState(type(norm)):
            def get_extra_state(self):
                return torch.tensor([7.0])

            def set_extra_state(self, state):
                self.loaded_extra_state = state

        norm.__class__ = WithExtraState
        return norm

    chunks = build_chunks(cfg, initialize=False)
    norm = te_like(chunks)
    load_model(chunks, converted["llama"] / "model")  # made without the extra state
    assert not hasattr(norm, "loaded_extra_state")
    plain = build_chunks(cfg, initialize=False)
    load_model(plain, converted["llama"] / "model")
    for a, b in zip(chunks[0].parameters(), plain[0].parameters()):
        assert torch.equal(a, b)
    save_model(chunks, converted["llama"].parent / "with_extra_state")
    load_model(build_chunks(cfg, initialize=False), converted["llama"].parent / "with_extra_state")
    untied = load_config(converted["qwen2"] / "config.yaml")  # a tied checkpoint
    untied.model.tie_embeddings = False  # asks for an output_layer.weight it does not hold
    untied.parallel.tensor_model_parallel_size = 1
    with pytest.raises(ConfigError, match=r"lacks 1 entries the model needs: "
                                          r"\['output_layer.weight'\]"):
        load_model(build_chunks(untied, initialize=False), converted["qwen2"] / "model")


def test_export_streams_into_planned_shards(hf_dirs, converted, tmp_path, single_rank):
    """Small shards: every tensor lands in the file the index names, each file is a valid
    safetensors file, and the weights round-trip exactly."""
    back = export_hf(converted["llama"], tmp_path / "hf", verbose=False, max_shard_bytes=40_000)
    index = json.loads((back / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files == sorted(p.name for p in back.glob("*.safetensors"))
    from safetensors import safe_open

    for name in files:
        with safe_open(back / name, "pt") as f:
            assert {k for k, v in index["weight_map"].items() if v == name} == set(f.keys())
    original, exported = read_hf_state(hf_dirs["llama"]), read_hf_state(back)
    assert sorted(original) == sorted(exported)
    assert all(torch.equal(t, exported[k]) for k, t in original.items())


def test_the_streaming_writer_takes_tensors_only_as_planned(tmp_path):
    from megatron_dvpo.conversion.safetensors_io import PlannedTensor, StreamingSafetensorsWriter

    plan = [PlannedTensor("a", (2, 3), torch.float32), PlannedTensor("b", (4,), torch.bfloat16)]
    writer = StreamingSafetensorsWriter(tmp_path, plan, max_shard_bytes=24)
    with pytest.raises(ValueError, match=r"got b \(4,\) torch.bfloat16, expected a \(2, 3\)"):
        writer.write("b", torch.zeros(4, dtype=torch.bfloat16))
    writer.write("a", torch.ones(2, 3))
    with pytest.raises(ValueError, match="1 planned tensors were never written"):
        writer.close()
