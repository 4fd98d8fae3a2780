"""Activation recompute and overlapped gradient reduction and parameter gather (issue 16): the
modules are really recomputed, the reductions really start in the backward pass, the gathers
really wait for the next forward pass, and no gradient or updated weight changes (exactly, in
fp32), with different data on each data-parallel rank."""

import json

import pytest

from conftest import REPO, launch
from megatron_dvpo.config import ConfigError, load_config, validate

VARIANTS = ["selective", "full_uniform", "full_block", "overlap", "full_uniform+overlap"]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("knobs") / "result.json"
    launch([str(REPO / "tests" / "distributed" / "memory_knobs.py"), str(out), *VARIANTS],
           nproc=2)
    return json.loads(out.read_text())


@pytest.mark.multirank
@pytest.mark.parametrize("model", ["policy", "gvm"])
def test_recompute_and_overlap_change_no_number(result, model):
    assert result[f"{model}_grad_max_abs"] > 1e-2  # the gradients compared are not all zero
    assert result[f"{model}_grad_rank_diff"] == 0.0  # the ranks' different data were reduced
    for variant in VARIANTS:
        assert result[f"{model}_{variant}_grad_max_diff"] == 0.0, variant
        assert result[f"{model}_{variant}_stepped_max_diff"] == 0.0, variant


@pytest.mark.multirank
@pytest.mark.parametrize("model", ["policy", "gvm"])
def test_the_knobs_are_really_on(result, model):
    calls = {v: result[f"{model}_{v}_calls"] for v in ["none", *VARIANTS]}
    updates = 2 * 2  # two updates of two microbatches
    assert calls["none"]["mlp"] == calls["none"]["core_attention"] == updates
    assert calls["selective"] == {**calls["none"], "core_attention": 2 * updates}  # core only
    for variant in ("full_uniform", "full_block", "full_uniform+overlap"):  # layer 0 in full
        assert calls[variant]["mlp"] == calls[variant]["core_attention"] == 2 * updates, variant
    assert calls["none"]["reductions_started_in_backward"] == 0
    overlap = calls["overlap"]  # small buckets: every one started before backward ended
    assert overlap["buckets"] > 1 and overlap["reductions_started_in_backward"] == \
        overlap["buckets"]


@pytest.fixture(scope="module")
def gathered(tmp_path_factory):
    work = tmp_path_factory.mktemp("gather")
    launch([str(REPO / "tests" / "distributed" / "param_gather.py"), str(work / "out.json"),
            str(work / "checkpoints")], nproc=2)
    return json.loads((work / "out.json").read_text())


@pytest.mark.multirank
def test_overlapped_param_gather_changes_no_weight(gathered):
    assert gathered["buckets"] > 1  # the gathers chain from bucket to bucket
    assert gathered["stale_before_forward"] > 1e-4  # the step left the gather to the forward
    assert gathered["logprob_diff_first_forward"] == 0.0  # ... whose pre-hooks did it
    assert gathered["after_forward"] == 0.0
    assert gathered["after_sync_params"] == 0.0  # a rollout or a copy needs no forward
    assert gathered["checkpoint"] == 0.0  # saved straight after a step: the stepped weights
    assert gathered["hooks_after_sync"] == 0 and gathered["hooks_in_update"] > 0


@pytest.mark.parametrize("overrides, message", [
    (["recompute.granularity=full", "recompute.num_layers=5"],
     "recompute.num_layers=5 exceeds the 4 model.num_layers (recompute.method=uniform)"),
    (["recompute.granularity=full", "recompute.method=block", "recompute.num_layers=3",
      "parallel.pipeline_model_parallel_size=2"],
     "recompute.num_layers=3 exceeds the 2 layers per pipeline stage (recompute.method=block)"),
    (["recompute.granularity=everything"], "recompute.granularity"),
    (["parallel.ddp_bucket_size=0"], "parallel.ddp_bucket_size must be > 0"),
    (["parallel.overlap_param_gather=true"],
     "parallel.overlap_param_gather=true needs parallel.use_distributed_optimizer=true"),
])
def test_recompute_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(load_config(None, ["model.num_layers=4", *overrides]), world_size=2)
