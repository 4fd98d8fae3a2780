"""`make demo` (the main job on the built-in tiny default) runs and reports real numbers."""

import re

import pytest

from conftest import torchrun


@pytest.mark.multirank
def test_demo_runs_at_tp2():
    out = torchrun(["-m", "megatron_dvpo.demo"], nproc=2).stdout
    assert "TP=2 PP=1" in out
    # examples/tiny.yaml: 2 x 1024 x 64 embeddings/head + 4 layers x 46,208 + final norm
    assert "policy GPTModel: 315,968 parameters (158,272 on this rank)" in out
    assert "GVM (value head): 250,497 parameters" in out
    mean = float(re.search(r"mean log-prob (-?[\d.]+)", out).group(1))
    assert abs(mean - (-6.908)) < 0.2  # near-uniform at initialisation over 1000 tokens
