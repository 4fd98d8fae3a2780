"""Data-parallel reductions and pipeline broadcasts: one GVM, DVPO and PPO step at DP=2 (with
different data per rank) and at PP=2 equal DP=1 over the concatenated batch; so do token-budget
microbatches (``tok``: rows sorted by length, microbatches of varying shapes)."""

import json

import pytest

from conftest import REPO, launch

SCRIPT = str(REPO / "tests" / "distributed" / "rl_equivalence.py")
PER_TOKEN_TOL = 1e-6  # advantages and losses
WEIGHT_TOL = 1e-5  # gradients and weights after one Adam step (fp32 summation order)


@pytest.fixture(scope="module")
def diffs(models, tmp_path_factory):
    work = models.linked(tmp_path_factory.mktemp("rl_equivalence"))
    for layout, nproc in (("dp2pp1", 2), ("dp1pp2", 2), ("dp2pp1tok", 2), ("dp1pp2tok", 2),
                          ("dp1pp1", 1), ("compare", 1)):
        launch([SCRIPT, str(work), layout], nproc=nproc)
    return json.loads((work / "diffs.json").read_text())


@pytest.mark.multirank
@pytest.mark.compat
@pytest.mark.parametrize("layout", ["dp2pp1", "dp1pp2", "dp2pp1tok", "dp1pp2tok"])
def test_one_step_of_each_job_equals_dp1(diffs, layout):
    d = diffs[layout]
    for key in ("gvm_loss", "dvpo_advantages", "dvpo_policy_loss", "ppo_advantages",
                "ppo_policy_loss", "ppo_critic_loss"):
        assert 0 <= d[key] <= PER_TOKEN_TOL, (layout, key, d)
    for key in ("gvm", "dvpo_policy", "ppo_policy", "ppo_critic"):
        for what in ("stepped", "grads"):
            assert 0 <= d[f"{key}_{what}"] <= WEIGHT_TOL, (layout, key, what, d)
        assert d[f"{key}_grads_max_abs"] > 1e-4, (layout, key, d)  # not trivially zero
    assert d["dvpo_advantage_max_abs"] > 0.1 and d["ppo_advantage_max_abs"] > 0.1
