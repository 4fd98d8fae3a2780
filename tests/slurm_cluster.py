"""A throwaway single-node Slurm cluster on localhost, for testing the sbatch launchers.

Starts slurmctld and slurmd from Debian's slurm-wlm with a generated slurm.conf (no munge:
auth/none), and stops exactly the daemons it started.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


def available() -> str | None:
    """None if a local cluster can be started here, else why not."""
    if os.geteuid() != 0:
        return "needs root to run slurmd"
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol")
               if shutil.which(b) is None]
    return f"Slurm is not installed (missing {missing}; apt-get install slurm-wlm)" if missing \
        else None


class LocalSlurm:
    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.pids: list[Path] = []

    def write_conf(self) -> None:
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        cpus = os.cpu_count() or 2
        memory = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.9)
        self.conf.write_text(f"""ClusterName=ci
SlurmctldHost={self.host}
SlurmUser=root
AuthType=auth/none
CredType=cred/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
KillWait=60
NodeName={self.host} CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")

    def start(self, timeout: float = 60) -> None:
        self.write_conf()
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([daemon, "-f", str(self.conf)], env=self.env, check=True)
            self.pids.append(self.root / f"{daemon}.pid")
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env,
                                   capture_output=True, text=True).stdout.strip()
            if state in ("idle", "mixed", "allocated"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"Slurm did not become ready (sinfo: {state!r}); see {self.root}/log")

    def sbatch(self, *args: str, cwd: Path, env: dict | None = None) -> str:
        out = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd,
                             env={**self.env, **(env or {})}, capture_output=True, text=True,
                             check=True).stdout
        return out.strip().split(";")[0]

    def job_state(self, job: str) -> str:
        out = subprocess.run(["scontrol", "show", "job", job], env=self.env,
                             capture_output=True, text=True).stdout
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def wait(self, job: str, timeout: float = 600) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.job_state(job)
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return state
            time.sleep(1)
        raise TimeoutError(f"job {job} still {self.job_state(job)} after {timeout}s")

    def stop(self) -> None:
        for pid_file in self.pids:
            if pid_file.is_file():
                try:
                    os.kill(int(pid_file.read_text()), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass
        time.sleep(1)
