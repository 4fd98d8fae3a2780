"""Is the run healthy: NaN/Inf accounting and divergence detection (docs/algorithm.md §2).

A *bad* step has a skipped non-finite update or a non-finite metric; ``max_bad_steps`` of them
in a row stop the run. A *diverged* step moved the weights somewhere they should not go: its
gradient norm is ``divergence_factor`` times the median of the previous ``divergence_window``
steps' (as Megatron-LM's and NeMo's spike checks compare a step with a running window), or its
update grew the parameters' norm ``divergence_factor``-fold at once (a learning rate 1e6 does
that in one step, with every loss and gradient finite). A diverged step stops the run at once:
its weights are already changed. The loop saves nothing during a bad streak, so the newest
checkpoint is always a good one.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Optional

import torch

from megatron_dvpo.device import device
from megatron_dvpo.training.trained_model import UpdateResult

MIN_WINDOW = 10  # steps of history before a gradient norm is compared with it


class UnhealthyRun(RuntimeError):
    """The run stops: too many bad steps in a row, or a diverged step."""


class NonFiniteError(UnhealthyRun):
    """Too many consecutive steps with a NaN or Inf loss, gradient or metric."""


class DivergedError(UnhealthyRun):
    """A finite blow-up: a gradient-norm spike or a jump of the parameters' norm."""


def parameters_norm(units: dict) -> float:
    """The L2 norm of every trained unit's parameters on every rank together (replicated
    parameters counted once per rank holding them: only ratios of it are used)."""
    squares = [torch.linalg.vector_norm(p.detach(), dtype=torch.float32).square()
               for unit in units.values() for chunk in unit.chunks for p in chunk.parameters()]
    total = (torch.stack(squares).sum().double().reshape(1) if squares
             else torch.zeros(1, dtype=torch.float64, device=device()))
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    return math.sqrt(float(total))  # one read of the device per step


class RunHealth:
    def __init__(self, max_bad_steps: int, divergence_factor: float, divergence_window: int,
                 grad_spikes: bool = True):
        self.max_bad_steps = max_bad_steps
        self.factor, self.window = divergence_factor, deque(maxlen=divergence_window)
        self.grad_spikes = grad_spikes  # whether a gradient-norm spike counts, or growth only
        self.skipped_steps = 0  # steps none of whose updates was applied (non-finite values)
        self.skipped_updates = 0  # updates skipped for a non-finite loss or gradient
        self.bad_in_a_row = 0

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps, "skipped_updates": self.skipped_updates}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_steps = state.get("skipped_steps", 0)
        self.skipped_updates = state.get("skipped_updates", 0)

    @property
    def in_bad_streak(self) -> bool:
        return self.bad_in_a_row > 0

    def account(self, step: int, updates: list[UpdateResult], metrics: dict[str, float],
                norm_growth: float) -> Optional[str]:
        """Count the step; a warning line for a bad step (None for a good one). Raises
        ``DivergedError`` for a diverged step and ``NonFiniteError`` for the
        ``max_bad_steps``-th bad step in a row."""
        self._check_divergence(step, updates, norm_growth)
        non_finite = [u for u in updates if u.non_finite]
        bad_metrics = [tag for tag, v in metrics.items() if not math.isfinite(v)]
        self.skipped_updates += len(non_finite)
        if non_finite and not any(u.applied for u in updates):
            self.skipped_steps += 1
        if not (non_finite or bad_metrics):
            self.bad_in_a_row = 0
            return None
        self.bad_in_a_row += 1
        reason = (f"{len(non_finite)} of {len(updates)} updates skipped for a NaN/Inf loss "
                  "or gradient" if non_finite else f"a non-finite {bad_metrics[0]}")
        if self.bad_in_a_row >= self.max_bad_steps:
            raise NonFiniteError(f"stopping at step {step}: {self.bad_in_a_row} consecutive bad "
                                 f"steps, the last with {reason} (max_bad_steps="
                                 f"{self.max_bad_steps})")
        return (f"step {step}: {reason} ({self.bad_in_a_row} bad steps in a row, "
                f"{self.skipped_updates} updates skipped in all)")

    def _check_divergence(self, step: int, updates: list[UpdateResult],
                          norm_growth: float) -> None:
        if not self.factor:
            return
        if norm_growth > self.factor:
            raise DivergedError(f"stopping at step {step}: its updates grew the parameters' "
                                f"norm {norm_growth:.3g}-fold (divergence_factor={self.factor:g}"
                                "); lower optimizer.lr")
        norms = [u.grad_norm for u in updates if u.applied and u.grad_norm is not None]
        if not norms or not self.grad_spikes:
            return
        norm = statistics.fmean(norms)
        if len(self.window) >= MIN_WINDOW:
            median = statistics.median(self.window)
            if median > 0 and norm > self.factor * median:
                raise DivergedError(f"stopping at step {step}: its gradient norm {norm:.3g} is "
                                    f"{norm / median:.3g}x the median {median:.3g} of the "
                                    f"previous {len(self.window)} steps (divergence_factor="
                                    f"{self.factor:g}); lower optimizer.lr")
        self.window.append(norm)
