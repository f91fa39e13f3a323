"""A real SLURM cluster on this machine, for the tests: munged, slurmctld and one slurmd per node.

Everything lives in one temporary folder (keys, sockets, spool, logs, slurm.conf), ports are picked
free, and every daemon is stopped by the process id in its pid file, also when a test fails. Clients
(sbatch, squeue, scontrol, scancel, sacct-free job records) find the cluster through ``SLURM_CONF``
in ``LocalSlurm.env``. Needs root (SlurmUser=root) and Debian's ``slurm-wlm`` and ``munge``, which
``scripts/setup.sh`` installs.

Nodes may live in Linux network namespaces (``netns``): then each slurmd runs inside its own namespace
with its own address, which is how the tests put two "machines" on one host.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

DAEMONS = ("munged", "slurmctld", "slurmd")


def slurm_available() -> Optional[str]:
    """None when a local cluster can run here, else the reason it cannot."""
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if missing:
        return f"{', '.join(missing)} not installed (scripts/setup.sh installs slurm-wlm and munge)"
    if os.geteuid() != 0:
        return "the local SLURM cluster runs its daemons as root (SlurmUser=root)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Node:
    name: str
    address: str = "127.0.0.1"
    netns: Optional[str] = None  # run this node's slurmd inside `ip netns exec <netns>`


@dataclass
class LocalSlurm:
    """A cluster of ``nodes`` (each with ``cpus`` CPUs) whose controller listens on ``controller``."""

    root: Path
    # Named after this machine: Lightning's SLURMEnvironment makes the first node's name the rendezvous
    # address (MASTER_ADDR), so it must resolve.
    nodes: list[Node] = field(default_factory=lambda: [Node(socket.gethostname())])
    cpus: int = 2
    controller: str = "127.0.0.1"
    pids: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        self.root = Path(self.root)
        self.ctld_port, self.slurmd_port = _free_port(), _free_port()
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"

    @property
    def env(self) -> dict[str, str]:
        """Environment for SLURM clients (and jobs) to reach this cluster."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        return env

    def start(self, timeout: float = 30.0) -> "LocalSlurm":
        try:
            self._start_munge()
            self._write_conf()
            self._daemon("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            self._wait(lambda: self._run("scontrol", "ping").returncode == 0 and "UP" in self._run("scontrol", "ping").stdout,
                       timeout, "slurmctld did not answer `scontrol ping`")
            for node in self.nodes:
                prefix = ["ip", "netns", "exec", node.netns] if node.netns else []
                self._daemon(f"slurmd-{node.name}", [*prefix, "slurmd", "-D", "-N", node.name, "-f", str(self.conf)])
            self._wait(self._nodes_idle, timeout, "the nodes did not come up idle (`sinfo`)")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every daemon this object started, by process id (TERM, then KILL after 10 s), and then
        whatever its jobs left running (slurmstepd, batch shells, srun, tasks), found by the SLURM_CONF
        in their environment."""
        for name, pid in reversed(list(self.pids.items())):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.time() + 10
            while time.time() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        for pid in self._job_processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.pids.clear()

    def _job_processes(self) -> list[int]:
        marker = f"SLURM_CONF={self.conf}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:  # gone, or not ours to read
                continue
        return found

    def __enter__(self) -> "LocalSlurm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- clients ---

    def _run(self, *cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)

    def sbatch(self, *args: str, cwd: Optional[Path] = None, env: Optional[dict[str, str]] = None) -> int:
        """Submit; the job inherits this cluster's client environment plus ``env``. Returns the job id."""
        out = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd,
                             capture_output=True, text=True, timeout=60)
        if out.returncode:
            raise RuntimeError(f"sbatch failed: {out.stderr}")
        return int(out.stdout.strip().split(";")[0].split("_")[0])

    def scancel(self, *args: str) -> None:
        out = self._run("scancel", *args)
        if out.returncode:
            raise RuntimeError(f"scancel {' '.join(args)} failed: {out.stderr}")

    def job(self, job_id: int | str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, RestartCount, ExitCode, ...); {} once purged."""
        out = self._run("scontrol", "-o", "show", "job", str(job_id))
        fields = {}
        for token in out.stdout.split():
            key, _, value = token.partition("=")
            fields.setdefault(key, value)
        return fields if out.returncode == 0 else {}

    def wait_for(self, job_id: int | str, states: set[str], timeout: float) -> dict[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} did not reach {states} in {timeout:.0f} s; last seen: {self.job(job_id)}")

    # --- internals ---

    def _start_munge(self) -> None:
        d = self.munge_socket.parent
        d.mkdir(parents=True, exist_ok=True)
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        d.chmod(0o700)
        self._daemon("munged", ["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
                                f"--pid-file={d / 'munged.pid'}", f"--log-file={d / 'munged.log'}", f"--seed-file={d / 'seed'}"])
        self._wait(self.munge_socket.exists, 10, "munged did not create its socket")

    def _write_conf(self) -> None:
        # cred_expire: a requeued job waits this long before it may start again (default 120 s); and it
        # starts at the scheduler's next periodic pass once eligible (sched_interval, default 60 s).
        if any(node.netns for node in self.nodes):
            # `ip netns exec` mounts a fresh /sys, without the cgroup hierarchy that slurmd's default
            # CgroupPlugin=autodetect looks for; cgroup/v1 starts without it (tests/netns.py).
            (self.root / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\n")
        spool = self.root / "spool"
        (spool / "ctld").mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            (spool / node.name).mkdir(parents=True, exist_ok=True)
        nodes = "\n".join(f"NodeName={n.name} NodeAddr={n.address} CPUs={self.cpus} State=UNKNOWN" for n in self.nodes)
        self.conf.write_text(f"""\
ClusterName=local
SlurmctldHost=localhost({self.controller})
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
CredType=cred/munge
StateSaveLocation={spool / 'ctld'}
SlurmdSpoolDir={spool}/%n
SlurmctldPidFile={self.root / 'slurmctld.pid'}
SlurmdPidFile={self.root / 'slurmd-%n.pid'}
SlurmctldLogFile={self.root / 'slurmctld.log'}
SlurmdLogFile={self.root / 'slurmd-%n.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=600
KillWait=5
SlurmctldTimeout=30
SlurmdTimeout=30
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _daemon(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / f"{name}.out", "ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=self.env)
        self.pids[name] = proc.pid
        time.sleep(0.2)
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited at once ({proc.returncode}); see {self.root / (name + '.out')}")

    def _nodes_idle(self) -> bool:
        out = self._run("sinfo", "-h", "-N", "-o", "%N %t")
        states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
        return all(states.get(n.name) == "idle" for n in self.nodes)

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ready():
                return
            time.sleep(0.3)
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.root.glob("*.out")) + sorted(self.root.glob("*.log")))
        raise TimeoutError(f"{what} within {timeout:.0f} s.\n{logs}")

    def logs(self) -> str:
        """The tail of every daemon log, for a failing test's message."""
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.out")))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child of ours counts as gone once reaped
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True
