"""megatron-core distributed checkpoints (torch_dist format), written atomically.

A checkpoint is first written to ``<dir>.partial`` by all ranks, its files' checksums recorded
(``megatron_dvpo.integrity``), then renamed into place by rank 0 after a barrier. A crash
mid-save leaves at most a ``.partial`` folder, never a half-written checkpoint under the final
name. Checkpoints reshard on load: any TP/PP layout reads any other.

Training checkpoints live in ``<save_dir>/iter_0000100/`` with the layout of a converted
checkpoint (``config.yaml`` and ``model/``, whose dist checkpoint also holds the optimizer), plus
``train_state.json`` (step, data position, LR scheduler, trainer extras) and one RNG file per
rank. ``<save_dir>/latest_checkpointed_iteration.txt`` names the newest; it is replaced
atomically after the directory is complete, and resume falls back to the newest complete
directory if the tracker is missing or stale.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import socket
import threading
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from megatron_dvpo.config import ConfigError
from megatron_dvpo.integrity import CheckpointDamaged, damage, write_checksums
from megatron_dvpo.staging import move_into_place
from megatron_dvpo.mcore_compat import (EXTRA_STATE, StrictHandling, adam_step,
                                        collect_write_results_in_process, init_adam_state,
                                        restore_adam_step)

TRACKER = "latest_checkpointed_iteration.txt"
_ITER = re.compile(r"iter_(\d{7})")

PARTIAL_SUFFIX = ".partial"
PRIMARY = "model"  # the subdirectory of a run's main model: the one every tool loads


def model_sharded_state_dict(chunks: list[torch.nn.Module]) -> dict:
    """Megatron-LM's layout: ``model`` for one chunk, ``model0``, ``model1``... under VPP."""
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _is_rank0() -> bool:
    from megatron_dvpo.distributed import is_rank0

    return is_rank0()


def is_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / "metadata.json").is_file()


def save_sharded(parts: dict[str, dict], directory: str | Path, overwrite: bool = False,
                 write_extras: Optional[Callable[[Path], None]] = None,
                 partial_suffix: str = PARTIAL_SUFFIX) -> Path:
    """Write dist checkpoints atomically (all ranks call this).

    ``parts`` maps a subdirectory ("" for ``directory`` itself) to the sharded state dict saved
    there; ``write_extras(partial_dir)`` runs on every rank before the rename, for files that
    must appear together with them. The files are written to ``<directory><partial_suffix>``
    first (a training run's own suffix: no two runs share one).
    """
    directory = Path(directory)
    partial = directory.with_name(directory.name + partial_suffix)
    if _is_rank0():
        if directory.exists() and not overwrite:
            raise FileExistsError(f"{directory} already exists; refusing to overwrite it")
        shutil.rmtree(partial, ignore_errors=True)
        for subdir in parts:
            (partial / subdir).mkdir(parents=True, exist_ok=True)
    _barrier()
    collect_write_results_in_process()
    for subdir, sharded_state_dict in parts.items():
        dist_checkpointing.save(sharded_state_dict, str(partial / subdir))
    if write_extras is not None:
        write_extras(partial)
    _barrier()
    write_checksums(partial)
    _barrier()
    if _is_rank0():
        move_into_place(partial, directory, ".old")
    _barrier()
    return directory


def load_sharded(sharded_state_dict: dict, directory: str | Path, partial: bool = False) -> dict:
    """Load ``sharded_state_dict`` from ``directory``; ``partial`` allows a subset of a key's
    shards (one layer of a layer-stacked tensor, say), which megatron otherwise rejects.

    Transformer Engine modules carry ``_extra_state`` (FP8 scaling history) that a checkpoint
    made with the local layer spec (or on a CPU) does not hold, and the other way round. Such
    entries are skipped (the module keeps its fresh state, as at the start of training); any
    other key the model asks for and the checkpoint lacks is an error naming it.
    """
    directory = Path(directory)
    if not is_checkpoint(directory):
        raise FileNotFoundError(f"{directory} is not a megatron dist checkpoint "
                                "(no metadata.json)")
    loaded, _, absent = dist_checkpointing.load(sharded_state_dict, str(directory),
                                                validate_access_integrity=not partial,
                                                strict=StrictHandling.RETURN_UNEXPECTED)
    missing = sorted(k for k in absent if not k.split("/")[0].endswith(EXTRA_STATE))
    if missing:
        raise ConfigError(f"{directory} lacks {len(missing)} entries the model needs: "
                          f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return loaded


def _load_state(chunk: torch.nn.Module, state: dict, skip: tuple[str, ...] = ()) -> None:
    """``load_state_dict`` that tolerates exactly the absences ``load_sharded`` allows: the
    ``skip`` prefixes and ``_extra_state`` entries."""
    missing, unexpected = chunk.load_state_dict(state, strict=False)
    wrong = [n for n in missing if not n.startswith(skip) and not n.endswith(EXTRA_STATE)]
    if wrong or unexpected:
        raise RuntimeError(f"the checkpoint does not fit the model: missing {wrong}, "
                           f"unexpected {list(unexpected)}")


def save_model(chunks: list[torch.nn.Module], directory: str | Path,
               overwrite: bool = False) -> Path:
    return save_sharded({"": model_sharded_state_dict(chunks)}, directory, overwrite=overwrite)


def read_model(chunks: list[torch.nn.Module], directory: str | Path,
               dtype: torch.dtype = torch.float32) -> dict[str, dict[str, torch.Tensor]]:
    """This rank's shards of the checkpoint's weights as ``dtype`` tensors, keyed as
    ``model_sharded_state_dict`` keys them; the chunks themselves are untouched. Entries the
    checkpoint lacks are absent."""
    def as_dtype(value):
        if not isinstance(value, (ShardedTensor, ShardedTensorFactory)) \
                or not value.data.is_floating_point():
            return value
        data = torch.empty_like(value.data, dtype=dtype)
        extra = {"dtype": dtype} if isinstance(value, ShardedTensor) else {}
        return dataclasses.replace(value, data=data, **extra)

    requested = {part: {name: as_dtype(v) for name, v in state.items()}
                 for part, state in model_sharded_state_dict(chunks).items()}
    loaded = load_sharded(requested, directory)
    return {part: {name: t for name, t in state.items()
                   if isinstance(t, torch.Tensor) and not name.endswith(EXTRA_STATE)}
            for part, state in loaded.items()}


def load_model(chunks: list[torch.nn.Module], directory: str | Path,
               skip: tuple[str, ...] = ()) -> None:
    """Load model weights saved at any TP/PP layout into this rank's chunks.

    Strict, except that parameters whose names start with a prefix in ``skip`` keep their
    current values (a GVM started from a policy keeps its zero-initialised value head).
    """
    requested = model_sharded_state_dict(chunks)
    for state in requested.values():
        for name in [n for n in state if n.startswith(skip)] if skip else []:
            del state[name]
    loaded = load_sharded(requested, directory)
    for i, chunk in enumerate(chunks):
        _load_state(chunk, loaded["model" if len(chunks) == 1 else f"model{i}"], skip)


# ---------------------------------------------------------------------------------------------
# Training checkpoints: model, optimizer, scheduler, RNG, data position.


def iteration_dir(save_dir: str | Path, step: int) -> Path:
    return Path(save_dir) / f"iter_{step:07d}"


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _training_sharded_state_dict(chunks, optimizer, is_loading: bool,
                                 optimizer_sharding: str) -> dict:
    state = model_sharded_state_dict(chunks)
    if optimizer is not None:
        if is_loading:
            init_adam_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(
            state, is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": optimizer_sharding})
    return state


def _load_into_chunks(chunks, loaded: dict) -> None:
    for i, chunk in enumerate(chunks):
        _load_state(chunk, loaded["model" if len(chunks) == 1 else f"model{i}"])


def _unit_state(unit) -> dict:
    return {"scheduler": unit.scheduler.state_dict(), "adam_step": adam_step(unit.optimizer)}


def save_training_checkpoint(save_dir: str | Path, step: int, units: dict, train_state: dict,
                             config_yaml: str, keep_last: int = 2,
                             optimizer_sharding: str = "dp_reshardable",
                             partial_suffix: str = PARTIAL_SUFFIX) -> Path:
    """Save every trained model of a run (``units``: name -> an object with ``chunks``,
    ``optimizer`` and ``scheduler``; the policy or GVM is ``model``) with the trainer state, in
    one directory, atomically; then move the tracker and prune old ones."""
    save_dir = Path(save_dir)
    target = iteration_dir(save_dir, step)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    primary, others = units[PRIMARY], {k: u for k, u in units.items() if k != PRIMARY}

    def extras(partial: Path) -> None:
        (partial / "rng").mkdir(exist_ok=True)
        torch.save(_rng_state(), partial / "rng" / f"rank_{_rank():05d}.pt")
        if _is_rank0():
            (partial / "config.yaml").write_text(config_yaml)
            state = {"step": step, "world_size": world, **_unit_state(primary),
                     "units": {name: _unit_state(unit) for name, unit in others.items()},
                     **train_state}
            (partial / "train_state.json").write_text(json.dumps(state, indent=2))

    for unit in units.values():  # overlap_param_gather: the stepped weights, not stale ones
        unit.sync_params()
    parts = {name: _training_sharded_state_dict(unit.chunks, unit.optimizer, False,
                                                optimizer_sharding)
             for name, unit in units.items()}
    save_sharded(parts, target, overwrite=True, write_extras=extras,
                 partial_suffix=partial_suffix)
    if _is_rank0():
        tmp = save_dir / (TRACKER + ".tmp")
        tmp.write_text(f"{step}\n")
        os.replace(tmp, save_dir / TRACKER)
        old = complete_checkpoints(save_dir)[:-keep_last] if keep_last > 0 else []
        # Deleting large checkpoints can take minutes on a parallel file system: in the
        # background, so that no rank waits for it in a collective (Python joins the thread
        # before the process exits).
        threading.Thread(target=_remove, args=(old,), name="prune-checkpoints").start()
    _barrier()
    return target


def _remove(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def _is_complete(path: Path) -> bool:
    return is_checkpoint(path / "model") and (path / "train_state.json").is_file()


def complete_checkpoints(save_dir: str | Path) -> list[Path]:
    """Complete iteration directories, oldest first (``.partial`` ones never count)."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    found = [p for p in save_dir.iterdir() if _ITER.fullmatch(p.name) and _is_complete(p)]
    return sorted(found, key=lambda p: p.name)


def resume_candidates(save_dir: str | Path) -> list[Path]:
    """Complete checkpoints in the order a resume tries them: the tracker's (when complete),
    then the others, newest first."""
    save_dir = Path(save_dir)
    found = complete_checkpoints(save_dir)[::-1]
    tracker = save_dir / TRACKER
    text = tracker.read_text().strip() if tracker.is_file() else ""
    named = iteration_dir(save_dir, int(text)) if text.isdigit() else None
    return ([named] if named in found else []) + [p for p in found if p != named]


def find_latest_checkpoint(save_dir: str | Path) -> Optional[Path]:
    """The tracker's checkpoint if it is complete, else the newest complete one, else None."""
    candidates = resume_candidates(save_dir)
    return candidates[0] if candidates else None


def resolve_checkpoint_dir(path: str | Path, key: str) -> Path:
    """A checkpoint directory (``config.yaml`` + ``model/``), or a save directory standing for
    its latest complete iteration, as Megatron-LM users expect; anything else is an error."""
    path = Path(path)
    if (path / "config.yaml").is_file() and is_checkpoint(path / "model"):
        return path
    latest = find_latest_checkpoint(path) if path.is_dir() else None
    if latest is None:
        raise ConfigError(f"{key}={path} is not a checkpoint directory (config.yaml and model/ "
                          "with a dist checkpoint) nor a save directory holding one")
    if _is_rank0():
        print(f"{key}={path}: using its latest checkpoint, {latest.name}", flush=True)
    return latest


def load_training_checkpoint(path: str | Path, units: dict,
                             optimizer_sharding: str = "dp_reshardable") -> dict:
    """Restore every unit (model, optimizer, scheduler) and this rank's RNG; returns the train
    state. A unit the checkpoint does not hold is an error naming it."""
    path = Path(path)
    train_state = json.loads((path / "train_state.json").read_text())
    for name, unit in units.items():
        if not is_checkpoint(path / name):
            raise ConfigError(f"checkpoint {path} holds no {name!r}: it was saved by a run "
                              "without that model; resume from a checkpoint of this kind of run")
        loaded = load_sharded(_training_sharded_state_dict(unit.chunks, unit.optimizer, True,
                                                           optimizer_sharding), path / name)
        _load_into_chunks(unit.chunks, loaded)
        state = train_state if name == PRIMARY else train_state["units"][name]
        with torch.no_grad():  # copies into the (leaf) fp32 main parameters in place
            unit.optimizer.load_state_dict(loaded["optimizer"])
        restore_adam_step(unit.optimizer, state.get("adam_step"))
        unit.scheduler.load_state_dict(state["scheduler"])
        # The optimizer's param groups carry their own max_lr/min_lr, restored from the
        # checkpoint above: give them the scheduler's (the config's under override_scheduler).
        for group in unit.optimizer.param_groups:
            group["max_lr"], group["min_lr"] = unit.scheduler.max_lr, unit.scheduler.min_lr
        unit.scheduler.step(increment=0)
    rng_file = path / "rng" / f"rank_{_rank():05d}.pt"
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if train_state.get("world_size") == world and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    elif _is_rank0():
        print(f"{path.name} was saved by {train_state.get('world_size')} ranks and this run has "
              f"{world}: each rank's random state starts again from the seed (sampling and "
              "dropout differ from an unbroken run; the data order continues)", flush=True)
    return train_state


class CheckpointManager:
    """A run's checkpoints: all its trained models and the trainer's state, saved together in
    one ``iter_N`` directory (through a temporary name of this run's own) and restored
    together, from the newest intact one (``megatron_dvpo.integrity``)."""

    def __init__(self, cfg, units: dict, config_yaml: Callable[[], str]):
        self.cfg, self.units, self.config_yaml = cfg, units, config_yaml
        self.partial_suffix = f"{PARTIAL_SUFFIX}-{_run_token()}"

    def latest_intact(self) -> Optional[Path]:
        """The newest checkpoint whose files are as written. A damaged one is named, in one
        line, and an older one tried, unless ``checkpoint.strict_resume``."""
        directory = self.cfg.load_dir or self.cfg.save_dir
        candidates = resume_candidates(directory) if directory else []
        for path in candidates:
            problem = damage(path)
            if problem is None:
                if path != candidates[0] and _is_rank0():
                    print(f"resuming from {path}, the newest intact checkpoint", flush=True)
                return path
            if self.cfg.strict_resume:
                raise CheckpointDamaged(f"checkpoint {path} is damaged: {problem} "
                                        "(checkpoint.strict_resume=true: no older one is tried)")
            if _is_rank0():
                print(f"warning: checkpoint {path} is damaged: {problem}; trying an older one",
                      flush=True)
        if candidates:
            raise CheckpointDamaged(f"every checkpoint in {directory} is damaged; the newest: "
                                    f"{damage(candidates[0])}")
        return None

    def save(self, step: int, train_state: dict) -> Optional[Path]:
        if not self.cfg.save_dir:
            return None
        return save_training_checkpoint(self.cfg.save_dir, step, self.units, train_state,
                                        self.config_yaml(), self.cfg.keep_last,
                                        self.cfg.optimizer_sharding, self.partial_suffix)

    def restore(self, path: Path) -> dict:
        return load_training_checkpoint(path, self.units, self.cfg.optimizer_sharding)


def _run_token() -> str:
    """A name for this run's temporary checkpoint directories, the same on every rank."""
    token = [f"{socket.gethostname()}-{os.getpid()}"]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(token, src=0)
    return token[0]
