"""``torchrun`` for Slurm jobs and terminals: stop signals go to the trainers, the launcher
waits for them to save, and its exit status is theirs.

torchrun's own handling of SIGTERM and SIGINT is to send SIGTERM to its workers and kill them
about 30 s later, which cuts off any checkpoint slower than that; SIGUSR1 (Slurm's
``--signal=USR1@T``) would kill the launcher itself. Here all three are forwarded to the worker
processes (the launcher's children, not theirs: helpers a worker starts are its own business)
instead, and torchrun keeps waiting: the trainers finish their step, save, and exit cleanly
(``training/loop.py``), and then the launcher exits with them. Slurm may also deliver the
signal to the workers directly; a duplicate is harmless. torchrun itself exits 1 whatever its
workers' status; the launcher exits with the first failed worker's (2 for bad input, 4 for an
unhealthy run: ``training/cli.py``).

    python -m megatron_dvpo.launch [torchrun arguments]
"""

import signal
import sys

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def forward_to_workers(signum, frame) -> None:
    import psutil

    for child in psutil.Process().children(recursive=False):
        try:
            child.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def main() -> int:
    from torch.distributed.elastic.multiprocessing import api
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    # torchrun installs ``api._terminate_process_handler`` (looked up when its workers start)
    # for SIGTERM, SIGINT, SIGHUP and SIGQUIT; the stop signals get ours, the others its own.
    terminate = api._terminate_process_handler

    def handler(signum, frame):
        if signum in FORWARDED:
            forward_to_workers(signum, frame)
        else:
            terminate(signum, frame)

    api._terminate_process_handler = handler
    for signum in FORWARDED:
        signal.signal(signum, forward_to_workers)
    try:
        torchrun()
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
        print(f"launch: rank {rank} failed first, exit status {code}", file=sys.stderr)
        return code or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
