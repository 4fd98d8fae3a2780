"""``torchrun`` for Slurm jobs and terminals: stop signals go to the trainers, and the launcher
waits for them to save.

torchrun's own handling of SIGTERM and SIGINT is to send SIGTERM to its workers and kill them
about 30 s later, which cuts off any checkpoint slower than that; SIGUSR1 (Slurm's
``--signal=USR1@T``) would kill the launcher itself. Here all three are forwarded to every worker
process instead, and torchrun keeps waiting: the trainers finish their step, save, and exit
cleanly (``training/loop.py``), and then the launcher exits with them. Slurm may also deliver the
signal to the workers directly; a duplicate is harmless.

    python -m megatron_dvpo.launch [torchrun arguments]
"""

import signal
import sys

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def forward_to_workers(signum, frame) -> None:
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            child.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def main() -> int:
    from torch.distributed.elastic.multiprocessing import api
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
    torchrun()
    return 0


if __name__ == "__main__":
    sys.exit(main())
