"""The command line every trainer shares: ``--config FILE [key=value ...]``.

Exit statuses: 0 a finished run, or one stopped by a signal after saving (SIGUSR1 also
requeues its Slurm job); 2 bad input, one ``error:`` line before any work; 3 the job stopped
itself (``rl.stop_on_gaming``), its step saved; 4 the run became unhealthy (``max_bad_steps``
NaN/Inf steps in a row, or a diverged step) and nothing was saved after the newest good
checkpoint, which the line names; 1 any other failure, one ``error:`` line per failing rank with
the traceback in ``<logging.run_dir>/logs/``.
"""

from __future__ import annotations

import argparse
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from megatron_dvpo.config import RunConfig, load_config, validate
from megatron_dvpo.distributed import init_distributed, launch_env, print_rank0, shutdown
from megatron_dvpo.errors import InputError, input_errors_exit
from megatron_dvpo.models.precision import Hardware, plan_precision
from megatron_dvpo.training.health import UnhealthyRun
from megatron_dvpo.training.loop import StoppedRun, TrainingLoop
from megatron_dvpo.training.preflight import preflight
from megatron_dvpo.training.signals import StopSignals

STOPPED_EXIT_STATUS = 3  # a job that stopped itself (rl.stop_on_gaming), its checkpoint saved
UNHEALTHY_EXIT_STATUS = 4  # NaN/Inf streak or divergence; the newest checkpoint is a good one
FAILED_EXIT_STATUS = 1


@contextmanager
def runtime_errors_exit(run_dir: str):
    """A failure after start-up as one ``error:`` line (the traceback to a log file) and an
    exit status that says what happened."""
    try:
        yield
    except (InputError, SystemExit, KeyboardInterrupt):
        raise
    except UnhealthyRun as e:  # every rank agrees: rank 0 says it
        print_rank0(f"error: {e}")
        raise SystemExit(UNHEALTHY_EXIT_STATUS) from None
    except Exception as e:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        log = Path(run_dir) / "logs" / f"error-rank{rank}.log"
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(traceback.format_exc())
            where = f"the traceback is in {log}"
        except OSError:
            where = "the traceback could not be written"
        summary = str(e).splitlines()[0] if str(e) else ""
        print(f"error: [rank {rank}] {type(e).__name__}: {summary} ({where})", flush=True)
        raise SystemExit(FAILED_EXIT_STATUS) from None


def run_trainer(job_class, description: str, argv=None,
                check: Callable[[RunConfig, list[str]], object] | None = None) -> None:
    """Parse, check, build ``job_class.build(cfg, checked)`` and run it through the
    ``TrainingLoop``.

    Everything that can be checked is checked before any process group or model exists: the
    precision plan, ``check(cfg, overrides)`` (the job's inputs: checkpoints, tokenizer, data,
    which it may resolve into ``cfg``), the layout, and ``preflight`` (writable directories,
    the save directory's lock, a resumed checkpoint's shapes, layout and LR schedule). Stop
    signals are recorded from the start, and ignored once the run has finished and saved.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML run config")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train_steps=10")
    args = parser.parse_args(argv)
    signals = StopSignals()
    previous = signals.install()
    try:
        with input_errors_exit():
            cfg = load_config(args.config, args.overrides)
            plan = plan_precision(cfg.precision, cfg.parallel, None, Hardware.detect())
            checked = check(cfg, args.overrides) if check is not None else None
            env = launch_env()
            validate(cfg, env.world_size)
            lock = preflight(cfg, job_class.updates_per_step(cfg), env.rank)
        try:
            _train(job_class, cfg, plan, signals, checked)
        finally:
            if lock is not None:
                lock.release()
    except BaseException:
        StopSignals.restore(previous)  # a caller in this process gets its handlers back
        raise
    # finished and saved: the stop signals stay ignored while the process ends


def _train(job_class, cfg: RunConfig, plan, signals: StopSignals, checked) -> None:
    init_distributed(cfg.parallel, cfg.seed)
    print_rank0(f"precision: {cfg.precision.params_dtype} parameters, {plan.describe()}")
    with input_errors_exit(), runtime_errors_exit(cfg.logging.run_dir):
        job = job_class.build(cfg, checked)  # from what the checks found: not checked again
        try:
            TrainingLoop(job.cfg, job, job.units, signals).run()
        except StoppedRun as stopped:
            print_rank0(f"stopped: {stopped}")
            shutdown()
            raise SystemExit(STOPPED_EXIT_STATUS) from None
    StopSignals.ignore()  # the run is saved: a late signal must not kill it in teardown
    shutdown()
