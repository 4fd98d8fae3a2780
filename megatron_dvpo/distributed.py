"""Process-group setup from torchrun or Slurm, megatron-core ``parallel_state``, and seeding."""

from __future__ import annotations

import datetime
import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import torch

from megatron_dvpo.config import ParallelConfig, validate_parallel
from megatron_dvpo.device import device, process_group_backend


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def free_port() -> int:
    """A port no one listens on now, on this host."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> LaunchEnv:
    """Read rank and rendezvous from torchrun, else from an ``srun`` task, else one process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (also torchrun inside Slurm)
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:  # one srun task per rank
        if "MASTER_ADDR" not in env:
            raise RuntimeError("running under srun without torchrun: export MASTER_ADDR "
                               "(e.g. the first host of `scontrol show hostnames`) and "
                               "MASTER_PORT before srun")
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                         int(env.get("SLURM_LOCALID", 0)), env["MASTER_ADDR"],
                         int(env.get("MASTER_PORT", 29500)))
    return LaunchEnv(0, 1, 0, "127.0.0.1", free_port())


def init_distributed(parallel: ParallelConfig, seed: int) -> LaunchEnv:
    """Create the default process group and megatron's TP/PP/CP/DP groups, then seed; a
    collective waits ``parallel.distributed_timeout_minutes`` for a stalled rank.

    NCCL (with gloo for host metadata) when CUDA is available, gloo otherwise; on CPU the
    megatron-core CUDA accommodations of ``megatron_dvpo.cpu_compat`` are installed here and
    nowhere else.
    """
    env = launch_env()
    validate_parallel(parallel, env.world_size)
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    else:
        from megatron_dvpo import cpu_compat

        cpu_compat.install()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend=process_group_backend(use_cuda),
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank, world_size=env.world_size,
            timeout=datetime.timedelta(minutes=parallel.distributed_timeout_minutes))
    set_parallel_layout(parallel)
    seed_everything(seed)
    return env


def set_parallel_layout(parallel: ParallelConfig) -> None:
    """(Re)build megatron's model-parallel groups over the existing default group."""
    from megatron.core import parallel_state

    validate_parallel(parallel, torch.distributed.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        distributed_timeout_minutes=parallel.distributed_timeout_minutes,
    )


def seed_everything(seed: int) -> None:
    """Megatron's scheme: the base seed differs per pipeline stage; TP regions get 2718 + tp_rank.

    Data-parallel replicas share seeds so that they start from identical weights.
    """
    from megatron.core import parallel_state, tensor_parallel

    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def is_rank0() -> bool:
    """Rank 0 of the process group, or, before one exists, the launcher's rank 0."""
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0


def print_rank0(*args, **kwargs) -> None:
    if is_rank0():
        print(*args, **kwargs, flush=True)


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def sum_over_replicas(keys: list[str], values: dict[str, float] | None) -> dict[str, float]:
    """Sum named scalars over one rank per data-parallel replica, and give every rank the sums.

    Per-token quantities live on the last pipeline stage, identical on its TP ranks; ``values``
    is None elsewhere. Every rank must call this with the same ``keys``.
    """
    from megatron.core import parallel_state

    contributes = (values is not None and parallel_state.is_pipeline_last_stage()
                   and parallel_state.get_tensor_model_parallel_rank() == 0)
    local = torch.tensor([float(values[k]) if contributes else 0.0 for k in keys],
                         dtype=torch.float64, device=device())
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(local)
    return dict(zip(keys, local.tolist()))


def all_reduce_data_parallel(value: float) -> float:
    from megatron.core import parallel_state

    t = torch.tensor([value], dtype=torch.float64, device=device())
    torch.distributed.all_reduce(t, group=parallel_state.get_data_parallel_group())
    return t.item()


def gather_data_parallel(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, of one shape on every rank, from each data-parallel rank, concatenated along
    dim 0 in rank order (on every rank: keep it small)."""
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group()
    parts = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


def gather_lists(items: list, contributes: bool) -> list:
    """The ``items`` of every rank where ``contributes`` holds, in rank order, on every rank
    (one replica's copy each, where model-parallel ranks hold the same items)."""
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, items if contributes else [])
    return [item for part in gathered for item in part]


def write_jsonl_rank0(path, rows: list[dict], what: str) -> None:
    """Rank 0 writes ``rows`` as JSON lines and says so."""
    import json

    if is_rank0():
        with open(path, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        print(f"wrote {len(rows)} {what} to {path}")


def all_reduce_max(value: float) -> float:
    """The largest ``value`` over every rank (a flag: any rank's NaN, any rank's signal)."""
    t = torch.tensor([value], dtype=torch.float64, device=device())
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.item()


def max_over_expert_group(values: list[int]) -> list[int]:
    """Each of ``values``' largest value over the ranks whose MoE layers exchange tokens (an
    expert-parallel group with its tensor-parallel ranks); ``values`` without expert
    parallelism. Those ranks' forwards must run in step, each with as many tokens (megatron's
    allgather dispatcher gathers equal shapes), so they pad and stop to agreed sizes."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized() or \
            parallel_state.get_expert_model_parallel_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.long, device=device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX,
                                 group=parallel_state.get_expert_tensor_and_model_parallel_group())
    return t.tolist()


def broadcast_from_last_stage(tensor: torch.Tensor | None, shape: tuple[int, ...],
                              dtype: torch.dtype) -> torch.Tensor:
    """A per-token tensor made on the last pipeline stage (None elsewhere), on every stage.

    The RL algorithm code then runs the same on all ranks, with no branch on the stage.
    """
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return tensor
    if parallel_state.is_pipeline_last_stage():
        tensor = tensor.to(dtype).contiguous()
    else:
        tensor = torch.empty(shape, dtype=dtype, device=device())
    torch.distributed.broadcast(tensor, parallel_state.get_pipeline_model_parallel_last_rank(),
                                group=parallel_state.get_pipeline_model_parallel_group())
    return tensor
