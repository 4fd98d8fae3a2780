"""The token cache of ``.jsonl`` inputs: built once, by one process, before any process group.

A cache entry is keyed by what determines its content: the file's resolved path, size and
modification time, the read options and the tokenizer's files. Two files with one name in
different folders, an edited file, other options or another tokenizer get entries of their own.

Building happens before ``torch.distributed`` exists (trainers call ``prepare`` from their input
check), so no rank waits for it inside a collective under a timeout. The first process to create
``<entry>.lock`` (``megatron_dvpo.locks``) builds; the others poll until the entry is complete or
the builder reports an error, which they raise as their own. A lock whose process died on this
host is taken over.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Callable

from megatron_dvpo import locks
from megatron_dvpo.data.preference import DataError

POLL_SECONDS = 0.5
REPORT_EVERY_SECONDS = 30.0


def _file_identity(path: Path) -> list:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def tokenizer_identity(tokenizer_path: str | Path) -> list:
    """The tokenizer's file(s) by path, size and mtime: a changed tokenizer is another key."""
    path = Path(tokenizer_path)
    if path.is_dir():
        return [_file_identity(p) for p in sorted(path.iterdir()) if p.is_file()]
    return [_file_identity(path)]


def cache_key(path: Path, tokenizer_path: str | Path, options) -> str:
    if not path.is_file():
        raise DataError(f"input file {path} does not exist")
    identity = {"file": _file_identity(path), "options": dataclasses.asdict(options),
                "tokenizer": tokenizer_identity(tokenizer_path)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def entry_prefix(path: str | Path, tokenizer_path: str | Path, cache_dir: str | Path,
                 options) -> Path:
    """``<cache_dir>/<stem>-<key>``: where the tokenized ``path`` lives (built or not)."""
    path = Path(path)
    return Path(cache_dir) / f"{path.stem}-{cache_key(path, tokenizer_path, options)}"


def _is_complete(prefix: Path) -> bool:
    return prefix.with_name(prefix.name + ".json").is_file()


def build_once(prefix: Path, build: Callable[[], object], label: str,
               report: Callable[[str], None] = print) -> Path:
    """Run ``build()`` (which writes the entry at ``prefix``) in exactly one process."""
    lock = prefix.with_name(prefix.name + ".lock")
    error = prefix.with_name(prefix.name + ".error")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    started = last_report = time.time()
    while not _is_complete(prefix):
        if not locks.try_acquire(lock):
            if error.is_file() and error.stat().st_mtime >= started:
                raise DataError(error.read_text())
            if time.time() - last_report >= REPORT_EVERY_SECONDS:
                last_report = time.time()
                report(f"waiting for {locks.describe(lock)} to tokenize {label} "
                       f"({last_report - started:.0f}s)")
            time.sleep(POLL_SECONDS)
            continue
        try:
            error.unlink(missing_ok=True)
            if not _is_complete(prefix):
                build()
        except Exception as e:
            error.write_text(str(e))
            raise
        finally:
            locks.release(lock)
    return prefix
