"""Write a megatron dist checkpoint whose tensors are computed on demand, one at a time.

megatron's torch_dist save gathers every tensor before writing. For conversion we instead plan
the checkpoint from a skeleton model whose parameters were allocated but never written (untouched
pages cost no memory) and let torch DCP's serial writer pull each tensor through the planner's
``resolve_data`` just before writing it. Only the tensor being written is resident, and the files
are byte-for-byte what megatron writes (same planner, same metadata, same common state).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed import checkpoint as dcp

# Given the skeleton tensor a write item refers to (a parameter or a view of one), return the
# real data with the same shape and dtype.
Materialize = Callable[[torch.Tensor], torch.Tensor]


class _OnDemandPlanner(MCoreSavePlanner):
    def __init__(self, materialize: Materialize, **kwargs):
        super().__init__(**kwargs)
        self._materialize = materialize

    def resolve_data(self, write_item):
        obj = self.lookup_object(write_item.index)
        if isinstance(obj, torch.Tensor):
            obj = self._materialize(obj)
        return self.transform_object(write_item, obj)


class OnDemandSaveStrategy(TorchDistSaveShardedStrategy):
    """``dist_checkpointing.save(..., sharded_strategy=OnDemandSaveStrategy(fn))``."""

    def __init__(self, materialize: Materialize):
        super().__init__("torch_dist", 1, thread_count=1)
        self._materialize = materialize

    def save(self, sharded_state_dict, checkpoint_dir: Path):
        sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, self.keep_only_main_replica)
        pyt_state_dict = mcore_to_pyt_state_dict(sharded_state_dict, False)
        planner = _OnDemandPlanner(self._materialize,
                                   dedup_replicated_tensors=not self.keep_only_main_replica,
                                   flatten_state_dict=False)
        writer = dcp.FileSystemWriter(str(checkpoint_dir), single_file_per_rank=True,
                                      thread_count=1)
        dcp.save(pyt_state_dict, storage_writer=writer, planner=planner)


class SkeletonParams:
    """Maps a tensor that views a skeleton parameter back to (parameter name, element range)."""

    def __init__(self, named_params: dict[str, torch.Tensor]):
        self._by_storage = {p.untyped_storage().data_ptr(): (name, p)
                            for name, p in named_params.items()}

    def locate(self, view: torch.Tensor) -> tuple[str, int]:
        name, param = self._by_storage[view.untyped_storage().data_ptr()]
        if not view.is_contiguous():
            raise ValueError(f"unexpected strided view of {name}")
        return name, view.storage_offset() - param.storage_offset()
