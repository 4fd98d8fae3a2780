"""Benchmark scripts run in their quick modes and write well-formed JSON (no timing asserts)."""

import json
import subprocess
import sys

from conftest import REPO


def test_bench_convert_quick(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench_convert.py"),
                           "--shape", "tiny", "--out", str(out), "--workdir", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["parameters"] == 202048
    assert result["largest_tensor_group"] == {"name": "embedding", "bytes": 1024 * 64 * 2}
    for direction in ("import", "export"):
        r = result[direction]
        assert r["seconds"] > 0 and r["peak_rss"] >= r["baseline_rss"] > 0
        assert r["increase_over_largest_group"] == r["peak_increase"] / (1024 * 64 * 2)
