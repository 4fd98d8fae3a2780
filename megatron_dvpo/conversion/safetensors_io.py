"""Read and write safetensors one tensor at a time, without memory-mapping whole shards.

Mapped shard pages count toward a process's RSS as they are touched, so reading a large model
through ``safe_open`` grows RSS to the model size. Reading each tensor with plain file I/O into a
tensor we own keeps the footprint at the tensors currently in use.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_dvpo.errors import InputError

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}
_SIZES = {dtype: torch.empty(0, dtype=dtype).element_size() for dtype in _DTYPES.values()}


class CheckpointError(InputError):
    """An HF or megatron checkpoint that cannot be converted; the message names what is wrong."""


def read_json(path: Path, what: str):
    """A JSON file of a checkpoint; a corrupt one is named in the error."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid {what} (not valid JSON: {e})") from None


def _read_header(path: Path) -> tuple[int, dict]:
    """(header length, header) of a safetensors file, naming the file if it is corrupt."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise CheckpointError(f"{path}: corrupt safetensors header (it claims {header_len} "
                                  f"header bytes; the file has {size})")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict) or any(
            not isinstance(v, dict) or v.get("dtype") not in _DTYPES or "data_offsets" not in v
            for k, v in header.items() if k != "__metadata__"):
        raise CheckpointError(f"{path}: corrupt safetensors header (entries need a known dtype, "
                              "a shape and data_offsets)")
    return header_len, header


class SafetensorsReader:
    """Index of every tensor in an HF directory (single file or sharded with an index)."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index, "safetensors index").get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map' mapping")
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (directory / f).is_file()]
            if missing:
                raise CheckpointError(f"{index} lists shards that are missing: {missing}")
        elif (directory / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise CheckpointError(f"{directory} has no model.safetensors or "
                                  "model.safetensors.index.json")
        self.entries: dict[str, tuple[Path, torch.dtype, list[int], int, int]] = {}
        for name in files:
            path = directory / name
            header_len, header = _read_header(path)
            end = 8 + header_len + max((info["data_offsets"][1] for key, info in header.items()
                                        if key != "__metadata__"), default=0)
            if path.stat().st_size < end:
                raise CheckpointError(f"{path} is truncated: {path.stat().st_size} bytes, its "
                                      f"header describes {end}")
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                start, end = info["data_offsets"]
                self.entries[key] = (path, _DTYPES[info["dtype"]], info["shape"],
                                     8 + header_len + start, end - start)

    def keys(self) -> set[str]:
        return set(self.entries)

    def shape(self, key: str) -> list[int]:
        return self.entries[key][2]

    def dtype(self, key: str) -> torch.dtype:
        return self.entries[key][1]

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        shape = self.shape(key)
        out = torch.empty(shape, dtype=dtype or self.dtype(key))
        self.read_rows_into(key, out.view(-1) if not shape else out)
        return out

    def read_rows_into(self, key: str, out: torch.Tensor, first_row: int = 0,
                       chunk_bytes: int = 8 * 1024 ** 2) -> None:
        """Copy rows ``first_row : first_row + len(out)`` of ``key`` into ``out`` (any dtype).

        Rows go through a bounded staging buffer, so reading a tensor costs its destination
        plus at most ``chunk_bytes``.
        """
        if key not in self.entries:
            raise CheckpointError(f"tensor {key!r} is missing from the HF checkpoint")
        path, stored, shape, offset, nbytes = self.entries[key]
        rows = shape[0] if shape else 1
        row_numel = out[0].numel() if out.dim() else 1
        row_bytes = nbytes // rows if rows else 0
        if first_row + out.shape[0] > rows or (shape and row_numel * rows != _numel(shape)):
            raise CheckpointError(f"{key!r} has shape {shape}; cannot read rows "
                                  f"{first_row}..{first_row + out.shape[0]} of {out.shape}")
        step = max(1, chunk_bytes // max(row_bytes, 1))
        flat = out.view(out.shape[0], -1)
        with open(path, "rb") as f:
            for start in range(0, out.shape[0], step):
                count = min(step, out.shape[0] - start)
                f.seek(offset + (first_row + start) * row_bytes)
                staging = torch.empty(count * row_numel, dtype=stored)
                if f.readinto(staging.view(torch.uint8).numpy()) != count * row_bytes:
                    raise CheckpointError(f"{path} is truncated: cannot read tensor {key!r}")
                flat[start:start + count].copy_(staging.view(count, row_numel))


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _SIZES[self.dtype]


def _header(tensors: list[PlannedTensor]) -> bytes:
    header, offset = {}, 0
    for t in tensors:
        header[t.name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(raw) + (-len(raw) % 8)) + raw + b" " * (-len(raw) % 8)


class StreamingSafetensorsWriter:
    """Writes planned tensors into ~``max_shard_bytes`` shards plus an HF index, each tensor
    to its file as it arrives: the headers are written from the plan, so no tensor waits in
    memory for the rest of its shard. Tensors must arrive in plan order."""

    def __init__(self, directory: Path, plan: list[PlannedTensor],
                 max_shard_bytes: int = 2 * 1024 ** 3):
        self.directory, self.plan = directory, plan
        self.shards: list[list[PlannedTensor]] = [[]]
        for t in plan:
            shard = self.shards[-1]
            if shard and sum(x.nbytes for x in shard) + t.nbytes > max_shard_bytes:
                self.shards.append([])
            self.shards[-1].append(t)
        count = len(self.shards)
        self.files = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self.order = [(i, t) for i, shard in enumerate(self.shards) for t in shard]
        self.written = 0
        self.handle, self.handle_index = None, -1

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.written >= len(self.order):
            raise ValueError(f"{name}: every planned tensor is already written")
        index, expected = self.order[self.written]
        if (name, tuple(tensor.shape), tensor.dtype) != (expected.name, expected.shape,
                                                         expected.dtype):
            raise ValueError(f"got {name} {tuple(tensor.shape)} {tensor.dtype}, expected "
                             f"{expected.name} {expected.shape} {expected.dtype} next")
        if index != self.handle_index:
            self._close_file()
            self.handle = open(self.directory / self.files[index], "wb")
            self.handle.write(_header(self.shards[index]))
            self.handle_index = index
        self.handle.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)
        self.written += 1

    def _close_file(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None

    def close(self) -> None:
        self._close_file()
        if self.written != len(self.order):
            missing = [t.name for _, t in self.order[self.written:]]
            raise ValueError(f"{len(missing)} planned tensors were never written: {missing[:3]}")
        weight_map = {t.name: self.files[i] for i, t in self.order}
        index = {"metadata": {"total_size": sum(t.nbytes for t in self.plan)},
                 "weight_map": weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
