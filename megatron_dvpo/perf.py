"""Model FLOPs utilisation: ``perf/mfu`` of every trainer, and the GPU peaks it is measured
against (the same numbers ``tools/bench_gpu.py`` and ``tools/gpu_smoke.py`` report)."""

from __future__ import annotations

from typing import Optional

import torch

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, by device-name fragment, most specific
# first.
DENSE_BF16_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "GH200": 989.4,
                          "A100": 312.0, "L40S": 362.1, "B200": 2250.0}


def dense_bf16_peak_tflops() -> Optional[float]:
    """This GPU's dense bf16 peak, or None (a CPU, or a GPU not in the table)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for fragment, peak in DENSE_BF16_PEAK_TFLOPS.items():
        if fragment in name:
            return peak
    return None


def model_flops_utilization(tokens_per_s: float, flops_per_token: float, devices: int,
                            peak_tflops: float) -> float:
    """The share of ``devices`` x peak that ``tokens_per_s`` trained tokens (all ranks together)
    of ``flops_per_token`` model FLOPs each amount to."""
    return tokens_per_s * flops_per_token / (devices * peak_tflops * 1e12)
