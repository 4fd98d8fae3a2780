"""Everything that depends on which megatron-core is installed, in one place.

Supported: megatron-core >= 0.16.1 and < 0.20 (Python 3.11 and 3.12). CI runs the full suite on
0.16.1 (the newest for Python 3.11) and a compatibility job on the newest release (see the
README). The APIs the project uses are the same across that range; what differs is collected
here: the version check, and the workarounds for megatron's optimizer state without apex or
Transformer Engine (torch's Adam underneath), which the releases handle alike.
"""

from __future__ import annotations

import queue
from typing import Optional

import torch
from megatron.core import __version__ as MCORE_VERSION
from megatron.core.dist_checkpointing.validation import StrictHandling

__all__ = ["MCORE_VERSION", "SUPPORTED", "EXTRA_STATE", "StrictHandling", "check_supported",
           "adam_step", "restore_adam_step", "init_adam_state", "collect_write_results_in_process"]

SUPPORTED = ((0, 16, 1), (0, 20, 0))  # [lowest, first unsupported)
# The state-dict suffix of a module's non-parameter state (Transformer Engine's FP8 metadata).
EXTRA_STATE = "_extra_state"


def _version(text: str) -> tuple[int, int, int]:
    parts = [int("".join(c for c in p if c.isdigit()) or 0) for p in text.split(".")[:3]]
    return tuple(parts + [0] * (3 - len(parts)))


def check_supported(version: str = MCORE_VERSION) -> None:
    """Raise unless ``version`` is in the supported range (an older or newer megatron-core may
    import and then compute something else)."""
    low, high = SUPPORTED
    if not low <= _version(version) < high:
        raise ImportError(f"megatron-core {version} is not supported: megatron_dvpo needs "
                          f">= {'.'.join(map(str, low))} and < {'.'.join(map(str, high))}")


def _torch_adams(optimizer) -> list:
    inner = [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    return [o for o in inner if isinstance(o, (torch.optim.Adam, torch.optim.AdamW))]


def adam_step(optimizer) -> Optional[float]:
    """The Adam step count, saved next to a checkpoint (see ``restore_adam_step``)."""
    for adam in _torch_adams(optimizer):
        for state in adam.state.values():
            return float(state["step"])
    return None


def restore_adam_step(optimizer, step: Optional[float]) -> None:
    """Undo the no-apex ``DistributedOptimizer.load_state_dict``, which gives every parameter
    one shared ``step`` tensor (torch's Adam then advances it once per parameter per update)
    holding the wrong value; each parameter gets its own, correct one."""
    if step is None:
        return
    for adam in _torch_adams(optimizer):
        for state in adam.state.values():
            state["step"] = torch.tensor(step)


def init_adam_state(optimizer) -> None:
    """Give every parameter Adam state (zeros, replaced in place by the load).

    Without apex/TE, megatron wraps torch's Adam, which keeps a per-parameter ``step`` that
    megatron's ``init_state_fn`` does not create, and ``DistributedOptimizer.state_dict``
    asserts on it: a freshly built optimizer cannot describe the state it is about to load.
    """
    for adam in _torch_adams(optimizer):
        for group in adam.param_groups:
            for param in group["params"]:
                state = adam.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param.data)
                    state["exp_avg_sq"] = torch.zeros_like(param.data)


def collect_write_results_in_process() -> None:
    """Give megatron's checkpoint writer a plain queue for its write results.

    ``filesystem_async`` makes that queue, on first use, with a spawned ``multiprocessing``
    Manager: a server process that takes about 1.4 s to start and lives as long as the job. It
    exists for asynchronous saves, whose writes run in another process; every save here is
    synchronous, so the results are put and taken in this process and a ``queue.Queue`` serves.
    There is then no helper process for a stop signal to kill: Slurm signals every process of
    a job step, and a Manager on the signal's default action took the next save down with a
    ``BrokenPipeError`` (the same module-level ``_results_queue`` in 0.16.1 and 0.19.2).
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


check_supported()
