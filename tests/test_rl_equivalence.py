"""Data-parallel reductions and pipeline broadcasts: one GVM, DVPO and PPO step at DP=2 (with
different data per rank) and at PP=2 equal DP=1 over the concatenated batch; so do token-budget
microbatches (``tok``: rows sorted by length, microbatches of varying shapes). In fp32 and in
bf16, each against DP=1 in its own precision, in two launches."""

import json

import pytest

from conftest import REPO, launch

SCRIPT = str(REPO / "tests" / "distributed" / "rl_equivalence.py")
LAYOUTS = ["dp2pp1", "dp1pp2", "dp2pp1tok", "dp1pp2tok"]
PER_TOKEN_TOL = 1e-6  # advantages and losses
WEIGHT_TOL = 1e-5  # gradients and weights after one Adam step (fp32 summation order)
# bf16 (eps = 2^-8 relative): gradients are reduced in fp32 (megatron's grad_reduce_in_fp32), so
# DP and PP reorder fp32 sums only, and the advantages and policy/critic losses stay within
# PER_TOKEN_TOL (measured <= 3.5e-7). Token-budget microbatches change the shapes a row is
# computed in: the bf16 GEMMs round differently, the GVM loss (O(1)) moves by up to 2 eps
# (measured 1.4e-3), gradients by up to 4 eps of the largest (measured 1.6 eps). A weight whose
# Adam update lands near a bf16 rounding boundary may round the other way: up to 2 ulps of the
# largest weight, 2^-7 x max|w| (measured 2.0e-3 against max|w| ~ 1).
BF16_EPS = 2.0 ** -8


@pytest.fixture(scope="module")
def diffs(models, tmp_path_factory):
    work = models.linked(tmp_path_factory.mktemp("rl_equivalence"))
    launch([SCRIPT, str(work), *LAYOUTS], nproc=2)  # two ranks: every layout, fp32 and bf16
    launch([SCRIPT, str(work), "dp1pp1", "compare"], nproc=1)
    return json.loads((work / "diffs.json").read_text())


def assert_equal_in_fp32(d: dict, layout: str) -> None:
    for key in ("gvm_loss", "dvpo_advantages", "dvpo_policy_loss", "ppo_advantages",
                "ppo_policy_loss", "ppo_critic_loss"):
        assert 0 <= d[key] <= PER_TOKEN_TOL, (layout, key, d)
    for key in ("gvm", "dvpo_policy", "ppo_policy", "ppo_critic"):
        for what in ("stepped", "grads"):
            assert 0 <= d[f"{key}_{what}"] <= WEIGHT_TOL, (layout, key, what, d)
        assert d[f"{key}_grads_max_abs"] > 1e-4, (layout, key, d)  # not trivially zero
    assert d["dvpo_advantage_max_abs"] > 0.1 and d["ppo_advantage_max_abs"] > 0.1


def assert_equal_in_bf16(d: dict, layout: str) -> None:
    for key in ("dvpo_advantages", "dvpo_policy_loss", "ppo_advantages", "ppo_policy_loss",
                "ppo_critic_loss"):
        assert 0 <= d[key] <= PER_TOKEN_TOL, (layout, key, d)
    assert 0 <= d["gvm_loss"] <= 2 * BF16_EPS, d
    for key in ("gvm", "dvpo_policy", "ppo_policy", "ppo_critic"):
        assert 0 <= d[f"{key}_grads"] <= 4 * BF16_EPS * d[f"{key}_grads_max_abs"], (layout, key)
        assert 0 <= d[f"{key}_stepped"] <= 2 * BF16_EPS * d[f"{key}_stepped_max_abs"], (
            layout, key, d)
        assert d[f"{key}_grads_max_abs"] > 1e-4, (layout, key, d)  # not trivially zero
    assert d["dvpo_advantage_max_abs"] > 0.1 and d["ppo_advantage_max_abs"] > 0.1


@pytest.mark.multirank
@pytest.mark.compat
@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_step_of_each_job_equals_dp1(diffs, layout):
    assert_equal_in_fp32(diffs[layout], layout)


@pytest.mark.multirank
@pytest.mark.parametrize("layout", LAYOUTS)
def test_in_bf16_one_step_of_each_job_equals_dp1(diffs, layout):
    assert_equal_in_bf16(diffs[f"{layout}-bf16"], layout)
