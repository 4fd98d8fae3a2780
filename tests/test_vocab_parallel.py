"""Vocab-parallel log-probs and entropy equal a full-vocabulary reference at TP=1 and TP=2."""

import json

import pytest

from conftest import REPO, launch

# Absolute for log-probs and entropy (the maths is fp32 for bf16 logits too); relative for the
# gradient, which a bf16 input stores in bf16 (8 bits of mantissa).
TOL = {"fp32": {"logprobs": 1e-5, "entropy": 1e-5, "grad": 1e-5},
       "bf16": {"logprobs": 1e-5, "entropy": 1e-5, "grad": 1e-2}}


@pytest.mark.multirank
def test_logprobs_and_entropy_match_the_full_vocabulary(tmp_path):
    """Log-probs are computed first, as the policy head does; the entropy after them must see
    the logits as they were (megatron's cross entropy works in place on its input)."""
    out = tmp_path / "vocab.json"
    launch([str(REPO / "tests/distributed/vocab_parallel_check.py"), str(out)], nproc=2)
    result = json.loads(out.read_text())
    assert len(result) == 2 * 2 * 2 * 3  # TP 1/2 x mbs 1/3 x fp32/bf16 x 3 quantities
    for key, diff in result.items():
        _, _, dtype, quantity = key.split("_")
        assert 0 <= diff <= TOL[dtype][quantity], (key, diff)
