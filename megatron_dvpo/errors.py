"""Bad input is reported as one line, ``error: ...``, with exit status 2: never a traceback.

Every error a user can act on (a config key, a file, a checkpoint, a tokenizer, a data row)
derives from ``InputError``. Entry points run their work inside ``input_errors_exit``.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager

# Before a process group exists every rank finds the same problem: rank 0 reports it and the
# others wait this long before exiting, so that torchrun does not stop rank 0 before it printed.
QUIET_RANK_GRACE_S = 3.0


class InputError(ValueError):
    """Input the user can fix; the message names the key, file, line or numbers involved."""


@contextmanager
def input_errors_exit():
    """Turn an ``InputError`` into ``error: ...`` on stderr and exit status 2."""
    try:
        yield
    except InputError as e:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            # the problem may be this rank's alone, so every rank that meets it says so
            prefix = f"[rank {dist.get_rank()}] " if dist.get_world_size() > 1 else ""
            print(f"error: {prefix}{e}", file=sys.stderr, flush=True)
        elif int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        else:
            time.sleep(QUIET_RANK_GRACE_S)
        raise SystemExit(2) from None
