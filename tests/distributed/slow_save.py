"""The GVM trainer with every checkpoint save made SLOW_SAVE_S seconds slower (for the launcher's
signal test: a save longer than torchrun's 30 s kill grace)."""

import os
import sys
import time

from megatron_dvpo import checkpointing
from megatron_dvpo.gvm.train import main

delay = float(os.environ["SLOW_SAVE_S"])
save = checkpointing.save_training_checkpoint


def slow_save(*args, **kwargs):
    print(f"saving slowly ({delay:.0f}s)", flush=True)
    time.sleep(delay)
    return save(*args, **kwargs)


checkpointing.save_training_checkpoint = slow_save

if __name__ == "__main__":
    main(sys.argv[1:])
