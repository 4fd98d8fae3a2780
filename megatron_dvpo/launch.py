"""``torchrun`` for Slurm jobs: the launcher ignores SIGUSR1, so only the trainers act on it.

Slurm's ``--signal=USR1@T`` reaches every process of the job step. torchrun's agent has no
handler for SIGUSR1 and would die from it, taking its workers down before they can save; ignored
here, the signal reaches the trainers, which install their own handler (``Trainer.run``), finish
the step, save, requeue the job and exit cleanly.

    python -m megatron_dvpo.launch [torchrun arguments]
"""

import signal
import sys

from torch.distributed.run import main

if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    sys.exit(main())
