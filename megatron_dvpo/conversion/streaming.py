"""Write a megatron dist checkpoint whose tensors are computed on demand, one at a time, and
read one layer of a layer-stacked tensor back without the others.

megatron's torch_dist save gathers every tensor before writing. For conversion we instead plan
the checkpoint from a skeleton model whose parameters were allocated but never written (untouched
pages cost no memory) and let torch DCP's serial writer pull each tensor through the planner's
``resolve_data`` just before writing it. Only the parameter being written is resident, and the files
are byte-for-byte what megatron writes (same planner, same metadata, same common state).

megatron stores a layer parameter as one key over all layers (``decoder.layers.mlp.linear_fc1.
weight`` of shape ``[L, ...]``), one chunk per layer and tensor-parallel part, and cannot load a
subset of a key's chunks in a one-process world. ``read_layer`` reads exactly the chunks of one
layer, each straight into its place (torch DCP's own reader holds a chunk three times over:
its bytes, the unpickled tensor and the copy), so export holds one layer's parameter at a time.
"""

from __future__ import annotations

import io
import re
import struct
import zipfile
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
from torch.distributed.checkpoint.metadata import MetadataIndex

# Builds a skeleton parameter's real data, by the parameter's name.
BuildParameter = Callable[[str], torch.Tensor]


class OnDemandParameters:
    """The real data behind views of skeleton parameters, one parameter resident at a time.

    torch DCP's writer keeps every tensor it has written until the save ends (its
    ``tensor_dict``, which only its safetensors format reads): one per checkpoint key, so a
    converted model would hold its embedding, output layer and one chunk of every stacked key.
    Each tensor handed out is therefore emptied (its storage resized to 0) when the writer asks
    for the next one, by which time the serial writer has written it.
    """

    def __init__(self, named_params: dict[str, torch.Tensor], build: BuildParameter):
        self._by_storage = {p.untyped_storage().data_ptr(): (name, p)
                            for name, p in named_params.items()}
        self._build = build
        self._name: str | None = None
        self._full: torch.Tensor | None = None
        self._handed_out: torch.Tensor | None = None

    def resolve(self, view: torch.Tensor) -> torch.Tensor:
        """The data of skeleton ``view``, in a tensor that owns exactly its own storage."""
        if self._handed_out is not None:
            self._handed_out.untyped_storage().resize_(0)
            self._handed_out = None
        name, param = self._by_storage[view.untyped_storage().data_ptr()]
        if not view.is_contiguous():
            raise ValueError(f"unexpected strided view of {name}")
        if name != self._name or self._full.untyped_storage().nbytes() == 0:
            self._name, self._full = name, None  # drop the previous parameter first
            self._full = self._build(name)
        offset = view.storage_offset() - param.storage_offset()
        data = self._full.view(-1)[offset:offset + view.numel()].view(view.shape)
        if data.nbytes != self._full.untyped_storage().nbytes():
            data = data.clone()  # a part: the writer would copy it anyway
        self._handed_out = data
        return data


class _OnDemandPlanner(MCoreSavePlanner):
    def __init__(self, parameters: OnDemandParameters, **kwargs):
        super().__init__(**kwargs)
        self._parameters = parameters

    def resolve_data(self, write_item):
        obj = self.lookup_object(write_item.index)
        if isinstance(obj, torch.Tensor):
            obj = self._parameters.resolve(obj)
        return self.transform_object(write_item, obj)


class OnDemandSaveStrategy(TorchDistSaveShardedStrategy):
    """``dist_checkpointing.save(..., sharded_strategy=OnDemandSaveStrategy(parameters))``."""

    def __init__(self, parameters: OnDemandParameters):
        super().__init__("torch_dist", 1, thread_count=1)
        self._parameters = parameters

    def save(self, sharded_state_dict, checkpoint_dir: Path):
        sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, self.keep_only_main_replica)
        pyt_state_dict = mcore_to_pyt_state_dict(sharded_state_dict, False)
        planner = _OnDemandPlanner(self._parameters,
                                   dedup_replicated_tensors=not self.keep_only_main_replica,
                                   flatten_state_dict=False)
        # no copy-ahead: the serial writer resolves each tensor after writing the one before
        writer = dcp.FileSystemWriter(str(checkpoint_dir), single_file_per_rank=True,
                                      thread_count=1, per_thread_copy_ahead=0)
        dcp.save(pyt_state_dict, storage_writer=writer, planner=planner)


class _Region(io.RawIOBase):
    """Bytes ``[offset, offset + length)`` of a file, as a seekable file of their own."""

    def __init__(self, f, offset: int, length: int):
        self.f, self.offset, self.length, self.pos = f, offset, length, 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = min(max(base + pos, 0), self.length)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")[:self.length - self.pos]
        self.f.seek(self.offset + self.pos)
        n = self.f.readinto(view)
        self.pos += n
        return n


def _read_chunk_into(directory: Path, info, out: torch.Tensor, what: str) -> None:
    """Copy one stored chunk (a ``torch.save`` archive inside a ``.distcp`` file, as torch DCP
    writes them) into the contiguous tensor ``out``, reading its data straight into place."""
    if getattr(info, "transform_descriptors", None):
        raise ValueError(f"{what}: stored with transforms {info.transform_descriptors}, which "
                         "this reader does not undo")
    with open(directory / info.relative_path, "rb") as f:
        region = _Region(f, info.offset, info.length)
        archive = zipfile.ZipFile(region)
        member = next((m for m in archive.infolist() if re.fullmatch(r"[^/]+/data/0", m.filename)),
                      None)
        nbytes = out.numel() * out.element_size()
        if member is None or member.compress_type != zipfile.ZIP_STORED or \
                member.file_size != nbytes:
            raise ValueError(f"{what}: the stored chunk is not one uncompressed tensor of "
                             f"{nbytes} bytes")
        region.seek(member.header_offset)
        local = region.read(30)  # the local file header: names and extras set the data start
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        region.seek(member.header_offset + 30 + name_len + extra_len)
        view = out.view(-1).view(torch.uint8).numpy()
        if region.readinto(memoryview(view)) != nbytes:
            raise ValueError(f"{what}: the stored chunk is truncated")


def read_layer(directory: Path, key: str, index: tuple[int, ...] = ()) -> torch.Tensor:
    """The entry ``index`` of the leading stacked axes (a layer, then an expert) of tensor
    ``key`` of a megatron dist checkpoint (the whole tensor for ``()``), reading only that
    entry's chunks, each straight into place."""
    metadata = dcp.FileSystemReader(str(directory)).read_metadata()
    entry = metadata.state_dict_metadata.get(key)
    if entry is None or not hasattr(entry, "chunks"):
        raise KeyError(f"{directory} holds no tensor {key!r}")
    lead = len(index)
    shape = [1] * lead + list(entry.size)[lead:]
    out = torch.empty(shape, dtype=entry.properties.dtype)
    for chunk in entry.chunks:
        offsets, sizes = list(chunk.offsets), list(chunk.sizes)
        if not all(o <= i < o + n for i, o, n in zip(index, offsets, sizes)):
            continue
        if any(n != 1 for n in sizes[:lead]):
            raise ValueError(f"{key}: a stored chunk spans {sizes[:lead]} stacked entries, "
                             "not one")
        offsets[:lead] = [0] * lead
        info = metadata.storage_data[MetadataIndex(key, chunk.offsets)]
        target = out
        for dim, (start, length) in enumerate(zip(offsets, sizes)):
            target = target.narrow(dim, start, length)
        if target.is_contiguous():
            _read_chunk_into(directory, info, target, key)
        else:  # a chunk split along an inner dimension: through a buffer of its size
            buffer = torch.empty(sizes, dtype=out.dtype)
            _read_chunk_into(directory, info, buffer, key)
            target.copy_(buffer)
    return out.reshape(out.shape[lead:])
