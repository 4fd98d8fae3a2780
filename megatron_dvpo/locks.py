"""Lock files that name their holder: one process (one job) owns a path at a time.

A lock is a file created exclusively (``O_CREAT | O_EXCL``, which shared file systems honour
where ``flock`` may not) holding ``host:pid:time:job``. A holder that died is recognised and
replaced: a process on this host that no longer exists, or (where one process of a job holds
it, as for a save directory) an earlier run of this same Slurm job, since a requeued job keeps
its id and may restart on another node. Used for the token cache's builds and for a run's save
directory.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path


def _this_job() -> str:
    return os.environ.get("SLURM_JOB_ID", "")


def describe(lock: Path) -> str:
    """The holder, for messages: ``pid 123 on host h (Slurm job 9) since 2026-12-03 08:00``."""
    try:
        host, pid, since, job = (lock.read_text().strip().split(":") + ["", "", "", ""])[:4]
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(since)))
    except (OSError, ValueError):
        return f"an unreadable lock {lock}"
    return f"pid {pid} on host {host}" + (f" (Slurm job {job})" if job else "") + f" since {when}"


def holder_gone(lock: Path, one_per_job: bool = False) -> bool:
    """Whether the lock's holder no longer exists: a process on this host that is gone, or,
    with ``one_per_job``, an earlier run of this Slurm job."""
    try:
        host, pid, _, job = (lock.read_text().strip().split(":") + ["", "", "", ""])[:4]
        if one_per_job and job and job == _this_job() and int(pid) != os.getpid():
            return True
        if host != socket.gethostname():
            return False
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError):  # unreadable, half-written, or not ours to signal
        return False
    return False


def try_acquire(lock: Path, one_per_job: bool = False) -> bool:
    """Create ``lock`` naming this process; False if another live holder has it. A gone
    holder's lock (``holder_gone``) is replaced."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if holder_gone(lock, one_per_job):
                lock.unlink(missing_ok=True)
                continue
            return False
        with os.fdopen(fd, "w") as f:
            f.write(f"{socket.gethostname()}:{os.getpid()}:{time.time()}:{_this_job()}\n")
        return True


def release(lock: Path) -> None:
    """Remove ``lock`` if this process holds it."""
    try:
        host, pid = lock.read_text().split(":")[:2]
    except (OSError, ValueError):
        return
    if host == socket.gethostname() and int(pid) == os.getpid():
        lock.unlink(missing_ok=True)
