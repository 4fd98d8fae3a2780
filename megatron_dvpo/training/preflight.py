"""What a training run checks before any process group or model exists, each problem in one
line: that it can write where it logs and saves, that no other run saves there, and that the
checkpoint it would resume from fits it (model shape, parallel layout, LR schedule)."""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import yaml

from megatron_dvpo import locks
from megatron_dvpo.checkpointing import PARTIAL_SUFFIX, find_latest_checkpoint
from megatron_dvpo.config import SHAPE_KEYS, ConfigError, RunConfig
from megatron_dvpo.training.trained_model import schedule_settings

# The config key behind each value of a saved schedule, for the resume check's message.
SCHEDULE_KEYS = {"max_lr": "optimizer.lr", "min_lr": "optimizer.min_lr",
                 "lr_warmup_steps": "optimizer.lr_warmup_steps",
                 "lr_decay_steps": "train_steps (x optimizer steps per step)",
                 "lr_decay_style": "optimizer.lr_decay_style",
                 "start_wd": "optimizer.weight_decay"}
LOCK = ".lock"


def check_writable(cfg: RunConfig) -> None:
    """The run's log and save directories exist or can be made, and take a file."""
    for key, path in (("logging.run_dir", cfg.logging.run_dir),
                      ("checkpoint.save_dir", cfg.checkpoint.save_dir)):
        if not path:
            continue
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
                pass
        except OSError as e:
            raise ConfigError(f"{key}={path} is not writable: {e.strerror or e}") from None


class SaveDirLock:
    """``<checkpoint.save_dir>/.lock``, held by the run's first process for the whole run: two
    runs saving into one directory would mix their checkpoints. A holder that is gone (a dead
    process on this host, an earlier run of this Slurm job) is replaced, and the temporary
    directories its interrupted saves left are removed."""

    def __init__(self, save_dir: str):
        self.save_dir = Path(save_dir)
        self.path = self.save_dir / LOCK

    def acquire(self) -> "SaveDirLock":
        if not locks.try_acquire(self.path, one_per_job=True):
            raise ConfigError(f"checkpoint.save_dir={self.save_dir} is in use by "
                              f"{locks.describe(self.path)}: two runs saving into one directory "
                              "corrupt each other's checkpoints; give this run its own "
                              f"save_dir, or delete {self.path} if that run is gone")
        atexit.register(self.release)
        for stale in sorted(self.save_dir.glob(f"iter_*{PARTIAL_SUFFIX}*")):
            shutil.rmtree(stale, ignore_errors=True)
            print(f"removed {stale}, left by an interrupted save", flush=True)
        return self

    def release(self) -> None:
        locks.release(self.path)


def _resume_point(cfg: RunConfig) -> Optional[Path]:
    resume_dir = cfg.checkpoint.load_dir or cfg.checkpoint.save_dir
    return find_latest_checkpoint(resume_dir) if resume_dir else None


def check_resume(cfg: RunConfig, updates_per_step: int) -> None:
    """A run that would resume must fit its checkpoint: the same parameter shapes, a layout its
    optimizer state can be read at, and the same LR schedule (or
    checkpoint.override_scheduler=true: otherwise config.yaml would record values the run does
    not use)."""
    latest = _resume_point(cfg)
    if latest is None:
        return
    saved = yaml.safe_load((latest / "config.yaml").read_text())
    shapes = [f"model.{k}: {getattr(cfg.model, k)!r} here, {saved['model'][k]!r} there"
              for k in SHAPE_KEYS if k in saved["model"] and saved["model"][k] != getattr(
                  cfg.model, k)]
    if shapes:
        raise ConfigError(f"cannot resume from {latest}: its model has other shapes "
                          f"({'; '.join(shapes)}); use another checkpoint.save_dir")
    state = json.loads((latest / "train_state.json").read_text())
    _check_layout(cfg, saved, latest)
    _check_schedule(cfg, state.get("scheduler") or {}, updates_per_step, latest)


def _check_layout(cfg: RunConfig, saved: dict, latest: Path) -> None:
    """The distributed optimizer's ``dp_reshardable`` state reads back at its TP and PP only."""
    parallel = saved.get("parallel", {})
    if not (parallel.get("use_distributed_optimizer")
            and saved.get("checkpoint", {}).get("optimizer_sharding") == "dp_reshardable"):
        return
    then = (parallel.get("tensor_model_parallel_size"),
            parallel.get("pipeline_model_parallel_size"))
    now = (cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size)
    if then != now:
        raise ConfigError(f"cannot resume from {latest} at TP={now[0]} PP={now[1]}: its "
                          f"distributed-optimizer state was saved at TP={then[0]} PP={then[1]} "
                          "with checkpoint.optimizer_sharding=dp_reshardable, which reshards the "
                          "data-parallel size only; resume at that layout (then save with "
                          "fully_reshardable to change it)")


def _check_schedule(cfg: RunConfig, saved: dict, updates_per_step: int, latest: Path) -> None:
    if cfg.checkpoint.override_scheduler:
        return
    wanted = schedule_settings(cfg.optimizer, cfg.train_steps * updates_per_step)
    keys = [k for k in SCHEDULE_KEYS if k in saved and saved[k] != wanted[k]]
    if wanted["lr_decay_style"] == saved.get("lr_decay_style") == "constant":
        keys = [k for k in keys if k != "lr_decay_steps"]  # a constant LR has no decay length
    diffs = [f"{SCHEDULE_KEYS[k]}: {wanted[k]!r} here, {saved[k]!r} in the checkpoint"
             for k in keys]
    if diffs:
        raise ConfigError(f"resuming from {latest} with a different LR schedule ("
                          f"{'; '.join(diffs)}); restore those values, or set "
                          "checkpoint.override_scheduler=true to continue with this config's")


def preflight(cfg: RunConfig, updates_per_step: int, rank: int) -> Optional[SaveDirLock]:
    """Every check above; the first rank also locks the save directory (returned)."""
    check_writable(cfg)
    check_resume(cfg, updates_per_step)
    if rank == 0 and cfg.checkpoint.save_dir:
        return SaveDirLock(cfg.checkpoint.save_dir).acquire()
    return None
