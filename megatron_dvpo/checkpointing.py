"""megatron-core distributed checkpoints (torch_dist format), written atomically.

A checkpoint is first written to ``<dir>.partial`` by all ranks, then renamed into place by rank 0
after a barrier. A crash mid-save leaves at most a ``.partial`` folder, never a half-written
checkpoint under the final name. Checkpoints reshard on load: any TP/PP layout reads any other.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from megatron.core import dist_checkpointing

PARTIAL_SUFFIX = ".partial"


def model_sharded_state_dict(chunks: list[torch.nn.Module]) -> dict:
    """Megatron-LM's layout: ``model`` for one chunk, ``model0``, ``model1``... under VPP."""
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def is_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / "metadata.json").is_file()


def save_sharded(sharded_state_dict: dict, directory: str | Path, overwrite: bool = False) -> Path:
    """Write a dist checkpoint to ``directory`` atomically (all ranks call this)."""
    directory = Path(directory)
    partial = directory.with_name(directory.name + PARTIAL_SUFFIX)
    if _is_rank0():
        if directory.exists() and not overwrite:
            raise FileExistsError(f"{directory} already exists; refusing to overwrite it")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier()
    dist_checkpointing.save(sharded_state_dict, str(partial))
    _barrier()
    if _is_rank0():
        if directory.exists():
            stale = directory.with_name(directory.name + ".old")
            directory.rename(stale)
            partial.rename(directory)
            shutil.rmtree(stale)
        else:
            partial.rename(directory)
    _barrier()
    return directory


def load_sharded(sharded_state_dict: dict, directory: str | Path, partial: bool = False) -> dict:
    """Load ``sharded_state_dict`` from ``directory``; ``partial`` allows a subset of a key's
    shards (one layer of a layer-stacked tensor, say), which megatron otherwise rejects."""
    directory = Path(directory)
    if not is_checkpoint(directory):
        raise FileNotFoundError(f"{directory} is not a megatron dist checkpoint "
                                "(no metadata.json)")
    return dist_checkpointing.load(sharded_state_dict, str(directory),
                                   validate_access_integrity=not partial)


def save_model(chunks: list[torch.nn.Module], directory: str | Path,
               overwrite: bool = False) -> Path:
    return save_sharded(model_sharded_state_dict(chunks), directory, overwrite=overwrite)


def load_model(chunks: list[torch.nn.Module], directory: str | Path) -> None:
    """Load model weights saved at any TP/PP layout into this rank's chunks (strict)."""
    state = load_sharded(model_sharded_state_dict(chunks), directory)
    if len(chunks) == 1:
        chunks[0].load_state_dict(state["model"], strict=True)
    else:
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(state[f"model{i}"], strict=True)
