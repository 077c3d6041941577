"""A real Slurm on this machine, to try cluster/slurm/train.sbatch without a cluster.

    python tools/slurm_local.py up /tmp/slurm --nodes 2    # prints the line to source
    export SLURM_CONF=/tmp/slurm/slurm.conf
    sbatch --nodes 2 cluster/slurm/train.sbatch +exp=tost_gpt2_smoke
    python tools/slurm_local.py down /tmp/slurm

Everything lives under one directory: a munge key and munged, slurmctld, and one slurmd per node
(`slurmd -N nodeK`), each node a NodeName on 127.0.0.1 with a port of its own, so that one host
acts as several. The node names do not resolve, as on clusters whose node names are not host
names. Needs root (slurmd starts jobs as their user) and Debian's slurmctld, slurmd, slurm-client and
munge packages, which `up` installs with apt-get when they are missing. `down` stops exactly the
daemons `up` started, by the pids it recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
DAEMONS = ["munged", "slurmctld", "slurmd"]
START_TIMEOUT_S = 60  # daemons up and every node idle; a cold start takes a few seconds
CANCEL_GRACE_S = 5  # at `down`, how long jobs and daemons have to end on SIGTERM


class SlurmUnavailable(RuntimeError):
    """This machine cannot run the local cluster (no root, or Slurm cannot be installed)."""


def ensure_installed() -> None:
    if all(shutil.which(d) for d in DAEMONS) and shutil.which("sbatch"):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("Slurm is not installed and installing it needs root")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable("Slurm is not installed and there is no apt-get to install it with")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SlurmUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: {done.stderr.strip()[-300:]}")


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class LocalSlurm:
    """munged + slurmctld + `nodes` slurmd under `root`; `env` is what clients (sbatch, squeue) need."""

    def __init__(self, root: Path, nodes: int = 2, cpus_per_node: int = 2) -> None:
        self.root = Path(root).resolve()
        self.nodes = [f"node{k}" for k in range(1, nodes + 1)]
        self.cpus_per_node = cpus_per_node
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def up(self) -> LocalSlurm:
        ensure_installed()
        if os.geteuid() != 0:
            raise SlurmUnavailable("slurmd runs jobs as their user, which needs root")
        for sub in ["state", "log", "run", *(f"spool/{n}" for n in self.nodes)]:
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)  # munged refuses a world-writable directory around its files
        self._start_munge()
        self._write_conf()
        self._daemon("slurmctld", ["slurmctld", "-f", str(self.conf), "-i"])
        for node in self.nodes:
            self._daemon(f"slurmd-{node}", ["slurmd", "-f", str(self.conf), "-N", node])
        self._wait_until_idle()
        return self

    def _start_munge(self) -> None:
        key = self.root / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self._daemon(
            "munged",
            [
                "munged",
                "--force",
                f"--socket={self.root / 'run' / 'munge.socket'}",
                f"--key-file={key}",
                f"--pid-file={self.root / 'run' / 'munged.pid'}",
                f"--log-file={self.root / 'log' / 'munged.log'}",
                f"--seed-file={self.root / 'run' / 'munged.seed'}",
            ],
            pid_file=self.root / "run" / "munged.pid",
        )

    def _write_conf(self) -> None:
        ctld_port, *node_ports = free_ports(1 + len(self.nodes))
        host = socket.gethostname()
        lines = [
            "ClusterName=whitebox-local",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.root / 'run' / 'munge.socket'}",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool' / '%n'}",
            f"SlurmctldPidFile={self.root / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'run' / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log' / 'slurmd-%n.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SlurmdParameters=config_overrides",  # every node claims the CPUs given here, on one host
            "JobRequeue=1",
            "ReturnToService=2",
            "MpiDefault=none",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=1,bf_interval=1",  # a requeued job starts soon after its begin time
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            "InactiveLimit=0",
            "KillWait=10",  # after the time limit or scancel: seconds between SIGTERM and SIGKILL
            "MinJobAge=300",
        ]
        for node, port in zip(self.nodes, node_ports, strict=True):
            lines.append(
                f"NodeName={node} NodeAddr=127.0.0.1 NodeHostname={host} Port={port} "
                f"CPUs={self.cpus_per_node} State=UNKNOWN"
            )
        lines.append(f"PartitionName=local Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _daemon(self, name: str, cmd: list[str], pid_file: Path | None = None) -> None:
        """Start a daemon that forks into the background and record its pid for `down`."""
        log = self.root / "log" / f"{name}.out"
        with open(log, "ab") as out:
            started = subprocess.run(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        if started.returncode != 0:
            raise SlurmUnavailable(f"{name} did not start (exit {started.returncode}): {log.read_text()[-500:]}")
        pid_file = pid_file or self.root / "run" / f"{name}.pid"  # SlurmctldPidFile, SlurmdPidFile
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (pid_file.exists() and pid_file.read_text().strip()):
            if time.monotonic() > deadline:
                raise SlurmUnavailable(f"{name} wrote no pid file {pid_file}")
            time.sleep(0.05)
        with open(self.root / "pids", "a") as pids:
            pids.write(f"{name} {pid_file.read_text().strip()}\n")

    def _wait_until_idle(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        states = ""
        while time.monotonic() < deadline:
            shown = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True)
            states = shown.stdout.strip()
            if (
                shown.returncode == 0
                and len(states.splitlines()) == len(self.nodes)
                and all(line.split()[1] == "idle" for line in states.splitlines())
            ):
                return
            time.sleep(0.2)
        raise SlurmUnavailable(f"nodes not idle after {START_TIMEOUT_S} s: {states!r}; see {self.root / 'log'}")

    def down(self) -> None:
        """Cancel the jobs, then stop the daemons `up` started and every process they started
        (slurmstepd and the jobs, which carry this cluster's SLURM_CONF), and only those."""
        pids_file = self.root / "pids"
        if not pids_file.exists():
            return
        daemons = [int(pid) for _, pid in (line.split() for line in pids_file.read_text().splitlines() if line.strip())]
        subprocess.run(["scancel", "--full", "--quiet", "--user", str(os.geteuid())], env=self.env, capture_output=True)
        deadline = time.monotonic() + CANCEL_GRACE_S
        while self._queue() and time.monotonic() < deadline:
            time.sleep(0.1)
        self._stop(list(reversed(daemons)), grace_s=CANCEL_GRACE_S)
        self._stop(self._descendants(), grace_s=0)  # what a daemon left behind (slurmstepd, job processes)
        pids_file.unlink()

    def _queue(self) -> str:
        shown = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True)
        return shown.stdout.strip() if shown.returncode == 0 else ""

    def _descendants(self) -> list[int]:
        """Processes with this cluster's SLURM_CONF in their environment: its jobs and their steps."""
        mark = f"SLURM_CONF={self.conf}".encode()
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                if mark in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
            except OSError:
                continue
        return found

    @staticmethod
    def _stop(pids: list[int], grace_s: float) -> None:
        """SIGTERM, then SIGKILL what is still there after `grace_s`."""
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie nobody reaps."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("root", type=Path, help="directory for the cluster's config, state and logs")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--cpus-per-node", type=int, default=2)
    args = parser.parse_args()
    cluster = LocalSlurm(args.root, args.nodes, args.cpus_per_node)
    if args.action == "up":
        try:
            cluster.up()
        except SlurmUnavailable as e:
            cluster.down()
            raise SystemExit(f"error: {e}") from None
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        cluster.down()


if __name__ == "__main__":
    main()
