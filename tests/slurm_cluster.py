"""A one-node SLURM for the tests, from the distribution's packages (`slurmctld`, `slurmd`, `munge`; `make test`
installs them when it runs as root): munged, slurmctld and slurmd started as daemons on 127.0.0.1 with their
key, configuration, state, spool, logs and pid files in a directory of their own, and each stopped by its own pid.
No accounting store: a job's state comes from `squeue`/`scontrol show job` and its log."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "sinfo", "srun", "scancel")


def why_not() -> str | None:
    """Why a local SLURM cannot be started here (None: it can)."""
    if os.name != "posix" or os.geteuid() != 0:
        return "a local SLURM needs root (slurmd runs the jobs); run the tests as root"
    missing = [name for name in DAEMONS + CLIENTS if not shutil.which(name, path=_path())]
    if missing:
        return (f"SLURM is not installed ({', '.join(missing)} missing): "
                "apt-get install -y slurmctld slurmd munge slurm-client (`make test` does it as root)")
    return None


def _path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024 - 1024  # leave the system 1 GB
    return 2000


class Slurm:
    """A running one-node SLURM; ``env`` has SLURM_CONF (and the sbin directories on PATH) for its clients."""

    def __init__(self, root: Path, partition: str = "debug"):
        self.root, self.partition = root, partition
        self.host = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf), "PATH": _path()}
        self.pids: dict[str, int] = {}

    def start(self, timeout: float = 60) -> "Slurm":
        for name in ("state", "spool", "log", "munge"):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        munge = self.root / "munge"
        os.chmod(munge, 0o700)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        socket_path = munge / "munge.socket"
        self._daemon("munged", ["munged", f"--key-file={key}", f"--socket={socket_path}",
                                f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}",
                                f"--seed-file={munge / 'munged.seed'}", "--force"], munge / "munged.pid")
        log, state = self.root / "log", self.root / "state"
        self.conf.write_text("\n".join([
            "ClusterName=recalltest",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", f"AuthInfo=socket={socket_path}", "CredType=cred/munge",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            f"StateSaveLocation={state}", f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={state / 'slurmctld.pid'}", f"SlurmdPidFile={state / 'slurmd.pid'}",
            f"SlurmctldLogFile={log / 'slurmctld.log'}", f"SlurmdLogFile={log / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "JobCompType=jobcomp/filetxt", f"JobCompLoc={log / 'jobcomp.txt'}",
            "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
            "MpiDefault=none", "ReturnToService=2", "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=1", "MinJobAge=3600", "MessageTimeout=10",
            "SlurmctldTimeout=30", "SlurmdTimeout=30", "InactiveLimit=0", "KillWait=5",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={_memory_mb()} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
            ""]))
        self._daemon("slurmctld", ["slurmctld", "-f", str(self.conf)], state / "slurmctld.pid")
        self._daemon("slurmd", ["slurmd", "-f", str(self.conf)], state / "slurmd.pid")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip()
            if out.startswith("idle"):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"the SLURM node did not come up: sinfo says {out!r}; see {log}")

    def _daemon(self, name: str, argv: list[str], pid_file: Path, timeout: float = 20) -> None:
        subprocess.run(argv, env=self.env, check=True, capture_output=True, timeout=timeout)  # forks, returns
        deadline = time.monotonic() + timeout
        while not (pid_file.exists() and pid_file.read_text().strip()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} wrote no pid file {pid_file}")
            time.sleep(0.1)
        self.pids[name] = int(pid_file.read_text().split()[0])

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=60, check=check)

    def jobs(self) -> dict[str, tuple[str, str, str]]:
        """Every job the controller knows (MinJobAge keeps finished ones an hour): job id -> (name, state, the
        directory it was submitted from)."""
        out = self.run("scontrol", "-o", "show", "job", check=False).stdout
        jobs = {}
        for line in out.splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            if "JobId" in fields:
                jobs[fields["JobId"]] = (fields.get("JobName", ""), fields.get("JobState", ""),
                                         fields.get("WorkDir", ""))
        return jobs

    def stop(self) -> None:
        """Each daemon by its own pid, the jobs' daemons first."""
        for name in reversed(DAEMONS):
            pid = self.pids.pop(name, None)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)
