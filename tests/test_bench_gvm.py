"""tools/bench_gvm.py's quick run, and what it reports over several seeds."""

import json
import subprocess
import sys

from conftest import REPO


def test_bench_gvm_quick(tmp_path):
    """Every objective trains on the compositional task and is compared with the reward model;
    the accuracies themselves are the benchmark's (README), not asserted here."""
    out = tmp_path / "gvm.json"
    proc = subprocess.run([sys.executable, "tools/bench_gvm.py", "--quick", "--tasks", "bigram",
                           "--seeds", "1", "--out", str(out), "--workdir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(out.read_text())["tasks"]["bigram"]["20"]
    assert set(row) == {"td", "td_pairwise", "v1_rm_scores", "bradley_terry"}
    for objective, result in row.items():
        assert set(result["seeds"]) == {"1"} and result["last"] == result["seeds"]["1"]["last"]
        if objective != "bradley_terry":
            assert 0 <= result["last"] <= 1 and result["gap_to_rm_points"] == round(
                100 * (row["bradley_terry"]["last"] - max(result["last"], result["mean"])), 2)


def test_bench_gvm_means_over_seeds():
    """What the benchmark reports over several seeds (its quick run above uses one)."""
    sys.path.insert(0, str(REPO / "tools"))
    from bench_gvm import mean_runs

    runs = {"1": {"last": 0.5, "mean": 0.75}, "2": {"last": 0.75, "mean": 0.25}}
    assert mean_runs(runs) == {"last": 0.625, "mean": 0.5, "seeds": runs}
