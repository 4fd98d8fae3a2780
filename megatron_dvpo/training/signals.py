"""Stop signals: recorded whenever they arrive, acted on only between steps.

SIGUSR1 (Slurm's ``--signal=USR1@T`` before the time limit), SIGTERM (preemption, ``scontrol
requeue``) and SIGINT (Ctrl-C) each make a run save once and stop cleanly; SIGUSR1 also requeues
its Slurm job. The trainer's command line installs the handlers before anything is built, so a
signal during start-up is not lost, and ignores the signals once the run has finished and
saved, so that one arriving during teardown cannot kill a run whose work is safe.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

from megatron_dvpo import distributed

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
DUPLICATE_SIGNAL_S = 2.0  # a signal again within this is the same one, delivered twice


class StopSignals:
    def __init__(self):
        self.received: int | None = None
        self._time = 0.0

    def install(self) -> dict:
        """Handle the stop signals; returns the handlers they had."""
        return {signum: signal.signal(signum, self._on_signal) for signum in STOP_SIGNALS}

    @staticmethod
    def restore(previous: dict) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    @staticmethod
    def ignore() -> None:
        """After the run: nothing is left to save, so a late signal must not kill the job."""
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)

    def _on_signal(self, signum, frame) -> None:
        """A second Ctrl-C interrupts at once, but not the copy the launcher forwards right
        after the terminal's own."""
        now = time.monotonic()
        if (signum == signal.SIGINT and self.received == signal.SIGINT
                and now - self._time > DUPLICATE_SIGNAL_S):
            raise KeyboardInterrupt
        if self.received is None:
            self.received, self._time = signum, now

    def requested(self) -> int:
        """The signal any rank received (0 if none), agreed by all ranks."""
        return int(distributed.all_reduce_max(float(self.received or 0)))

    @staticmethod
    def requeue_if_asked(signum: int) -> None:
        """SIGUSR1 in a Slurm job: put the job back in the queue (rank 0)."""
        job = os.environ.get("SLURM_JOB_ID")
        if signum == signal.SIGUSR1 and job and distributed.is_rank0():
            subprocess.run(["scontrol", "requeue", job], check=False)
