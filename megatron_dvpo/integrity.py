"""Checkpoint integrity: every file's size and CRC-32, recorded when a checkpoint is written and
verified before it is trusted.

A save writes ``checksums.json`` (relative path -> [bytes, CRC-32]) into the checkpoint once all
its files are complete and before it is renamed into place. Hashing and verifying are shared
round-robin among the ranks (all ranks call both), so a large checkpoint costs each rank its
share of the reading. A bit flip, a block of zeros, a truncated or a missing file is found and
named; a checkpoint made before checksums existed has none and loads unverified.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Optional

import torch

from megatron_dvpo.errors import InputError

CHECKSUMS = "checksums.json"
_BLOCK = 16 << 20


class CheckpointDamaged(InputError):
    """A checkpoint whose files are not what was written; the message names the file."""


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            crc = zlib.crc32(block, crc)
    return crc


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _share(items: list) -> list:
    """This rank's round-robin share of ``items`` (all of them without a process group)."""
    if not _distributed():
        return items
    return items[torch.distributed.get_rank()::torch.distributed.get_world_size()]


def _gathered(items: list) -> list:
    if not _distributed():
        return items
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def write_checksums(directory: Path) -> None:
    """Record the size and CRC-32 of every file under ``directory`` (all ranks call this)."""
    names = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                   if p.is_file() and p.name != CHECKSUMS)
    table = dict(_gathered([(n, [(directory / n).stat().st_size, _crc32(directory / n)])
                            for n in _share(names)]))
    if not _distributed() or torch.distributed.get_rank() == 0:
        (directory / CHECKSUMS).write_text(json.dumps(table, indent=0, sort_keys=True))


def damage(directory: str | Path, under: tuple[str, ...] = ()) -> Optional[str]:
    """The first file of checkpoint ``directory`` (of its subdirectories ``under``, if given)
    that differs from what was written, as one line; None when all match or no checksums were
    recorded. All ranks call this and get the same answer."""
    directory = Path(directory)
    listing = directory / CHECKSUMS
    if not listing.is_file():
        return None
    table = json.loads(listing.read_text())
    names = sorted(n for n in table if not under or n.split("/")[0] in under)
    problems = []
    for name in _share(names):
        path, (size, crc) = directory / name, table[name]
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{path} has {path.stat().st_size} bytes where {size} were written")
        elif (got := _crc32(path)) != crc:
            problems.append(f"{path} is not what was written (CRC-32 {got:08x}, written "
                            f"{crc:08x})")
    problems = sorted(_gathered(problems))
    return problems[0] if problems else None


def require_intact(directory: str | Path, under: tuple[str, ...] = ()) -> None:
    """Refuse to load from a damaged checkpoint."""
    problem = damage(directory, under)
    if problem is not None:
        raise CheckpointDamaged(f"checkpoint {directory} is damaged: {problem}")
