"""The command line every trainer shares: ``--config FILE [key=value ...]``."""

from __future__ import annotations

import argparse
from typing import Callable

from megatron_dvpo.config import RunConfig, load_config, validate
from megatron_dvpo.distributed import init_distributed, launch_env, print_rank0, shutdown
from megatron_dvpo.errors import input_errors_exit
from megatron_dvpo.models.precision import Hardware, plan_precision
from megatron_dvpo.training.loop import StoppedRun, TrainingLoop, check_resume_schedule

STOPPED_EXIT_STATUS = 3  # a job that stopped itself (rl.stop_on_gaming), its checkpoint saved


def run_trainer(job_class, description: str, argv=None,
                check: Callable[[RunConfig, list[str]], object] | None = None) -> None:
    """Parse, check, build ``job_class(cfg)`` and run it through the ``TrainingLoop``.

    Everything that can be checked is checked before any process group or model exists: the
    precision plan, ``check(cfg, overrides)`` (the job's inputs: checkpoints, tokenizer, data,
    which it may resolve into ``cfg``), the layout and a resumed run's LR schedule. Bad input
    ends as one ``error: ...`` line and exit status 2.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML run config")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train_steps=10")
    args = parser.parse_args(argv)
    with input_errors_exit():
        cfg = load_config(args.config, args.overrides)
        plan = plan_precision(cfg.precision, cfg.parallel, None, Hardware.detect())
        if check is not None:
            check(cfg, args.overrides)
        validate(cfg, launch_env().world_size)
        check_resume_schedule(cfg, job_class.updates_per_step(cfg))
    init_distributed(cfg.parallel, cfg.seed)
    print_rank0(f"precision: {cfg.precision.params_dtype} parameters, {plan.describe()}")
    with input_errors_exit():
        job = job_class(cfg)
        try:
            TrainingLoop(job.cfg, job, job.units).run()
        except StoppedRun as stopped:
            print_rank0(f"stopped: {stopped}")
            shutdown()
            raise SystemExit(STOPPED_EXIT_STATUS) from None
    shutdown()
