"""A throwaway Slurm cluster on localhost, for testing the sbatch launchers.

Starts slurmctld and one slurmd per node from Debian's slurm-wlm with a generated slurm.conf (no
munge: auth/none), and stops exactly the daemons it started. Several nodes run on this one host
(``slurmd -N NAME``, a port each); their names resolve through an /etc/hosts line that is
removed again when the cluster stops.
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


HOSTS = Path("/etc/hosts")


class LocalSlurm:
    def __init__(self, root: Path, nodes: int = 2):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.nodes = [f"ci{i + 1}" for i in range(nodes)]
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.pids: list[Path] = []
        self._hosts_line = f"127.0.0.1 {' '.join(self.nodes)}  # tests/slurm_cluster.py\n"

    def write_conf(self) -> None:
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        cpus = os.cpu_count() or 2
        memory = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.4)
        nodes = "\n".join(f"NodeName={name} NodeHostname={self.host} NodeAddr=127.0.0.1 "
                           f"Port={6818 + i} CPUs={cpus} RealMemory={memory} State=UNKNOWN"
                           for i, name in enumerate(self.nodes))
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
SlurmdSpoolDir={self.root}/spool/%n
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd-%n.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd-%n.log
SlurmctldPort=6817
KillWait=60
{nodes}
PartitionName=debug Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")

    def start(self, timeout: float = 60) -> None:
        self.write_conf()
        with HOSTS.open("a") as hosts:
            hosts.write(self._hosts_line)
        subprocess.run(["slurmctld", "-f", str(self.conf)], env=self.env, check=True)
        self.pids.append(self.root / "slurmctld.pid")
        for name in self.nodes:
            subprocess.run(["slurmd", "-f", str(self.conf), "-N", name], env=self.env, check=True)
            self.pids.append(self.root / f"slurmd-{name}.pid")
        deadline = time.time() + timeout
        while time.time() < deadline:
            states = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env,
                                    capture_output=True, text=True).stdout.split()
            if len(states) == len(self.nodes) and all(
                    s in ("idle", "mixed", "allocated") for s in states):
                return
            time.sleep(0.5)
        raise RuntimeError(f"Slurm did not become ready (sinfo: {states!r}); see {self.root}/log")

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
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                         "OUT_OF_MEMORY"):
                return state
            time.sleep(1)
        raise TimeoutError(f"job {job} still {self.job_state(job)} after {timeout}s")

    def release_requeued(self, job: str) -> None:
        """Start a requeued job now instead of after Slurm's ~2-minute hold."""
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=self.env,
                       capture_output=True)

    def restarts(self, job: str) -> int:
        out = subprocess.run(["scontrol", "show", "job", job], env=self.env,
                             capture_output=True, text=True).stdout
        return int(next(f for f in out.split() if f.startswith("Restarts=")).split("=")[1])

    def stop(self) -> None:
        for pid_file in self.pids:
            if pid_file.is_file():
                try:
                    os.kill(int(pid_file.read_text()), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass
        time.sleep(1)
        text = HOSTS.read_text()
        if self._hosts_line in text:
            HOSTS.write_text(text.replace(self._hosts_line, ""))
