"""Write a megatron dist checkpoint whose tensors are computed on demand, one at a time, and
read one layer of a layer-stacked tensor back without the others.

megatron's torch_dist save gathers every tensor before writing. For conversion we instead plan
the checkpoint from a skeleton model whose parameters were allocated but never written (untouched
pages cost no memory) and let torch DCP's serial writer pull each tensor through the planner's
``resolve_data`` just before writing it. Only the tensor being written is resident, and the files
are byte-for-byte what megatron writes (same planner, same metadata, same common state).

megatron stores a layer parameter as one key over all layers (``decoder.layers.mlp.linear_fc1.
weight`` of shape ``[L, ...]``), one chunk per layer and tensor-parallel part, and cannot load a
subset of a key's chunks in a one-process world. ``read_layer`` asks torch DCP for exactly the
chunks of one layer, so export holds one layer's parameter at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

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


class _RegionPlanner(DefaultLoadPlanner):
    """Reads the chunks of ``key`` that overlap ``layer`` (all of them for None) into ``dest``."""

    def __init__(self, key: str, layer: Optional[int]):
        super().__init__()
        self.key, self.layer = key, layer
        self.dest: Optional[torch.Tensor] = None

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.metadata = metadata
        entry = metadata.state_dict_metadata.get(self.key)
        if entry is None or not hasattr(entry, "chunks"):
            raise KeyError(f"the checkpoint has no tensor {self.key!r}")
        shape = list(entry.size)
        if self.layer is not None:
            shape[0] = 1
        self.dest = torch.empty(shape, dtype=entry.properties.dtype)

    def create_local_plan(self) -> LoadPlan:
        items = []
        for chunk in self.metadata.state_dict_metadata[self.key].chunks:
            offsets, sizes = list(chunk.offsets), list(chunk.sizes)
            storage = [0] * len(offsets)
            if self.layer is not None:
                if not offsets[0] <= self.layer < offsets[0] + sizes[0]:
                    continue
                storage[0], offsets[0], sizes[0] = self.layer - offsets[0], 0, 1
            items.append(ReadItem(LoadItemType.TENSOR, MetadataIndex(self.key, offsets),
                                  torch.Size(offsets), MetadataIndex(self.key, chunk.offsets),
                                  torch.Size(storage), torch.Size(sizes)))
        return LoadPlan(items)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        view = self.dest
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            view = view.narrow(dim, start, length)
        return view

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass  # read straight into ``dest``


def read_layer(directory: Path, key: str, layer: Optional[int]) -> torch.Tensor:
    """Layer ``layer`` of the layer-stacked tensor ``key`` of a megatron dist checkpoint (the
    whole tensor for None), reading only its chunks."""
    planner = _RegionPlanner(key, layer)
    dcp.load({}, storage_reader=dcp.FileSystemReader(str(directory)), planner=planner,
             no_dist=True)
    return planner.dest[0] if layer is not None else planner.dest
