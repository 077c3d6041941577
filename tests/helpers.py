"""What tests share besides fixtures: launching the real entry point as users do, reading back
what a run recorded, and the handle of the local S3 server (conftest.py starts it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pretrain.distributed import free_port

REPO = Path(__file__).resolve().parent.parent
MAIN = str(REPO / "pretrain" / "main.py")

# A model and batch small enough for a launcher run of a few steps to take seconds on 2 cores.
TINY = [
    "model.n_layer=2",
    "model.n_head=4",
    "model.n_embd=64",
    "model.seq_len=32",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.log_interval=1",
    "data.stdlib_max_mb=0.25",
    "data.samples_per_shard=128",
]


def launch_command(launcher: str, overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that run pretrain/main.py under `deepspeed`, `torchrun`
    (2 processes each), the cluster templates' per-node launcher (`node`) or plain `python`."""
    extra_env: dict[str, str] = {}
    if launcher == "deepspeed":
        cmd = [shutil.which("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), MAIN]
    elif launcher == "node":  # the cluster templates' per-node launcher, as one node of two ranks
        cmd = [str(REPO / "cluster" / "launch_node.sh")]
        extra_env = {
            "NNODES": "1",
            "NODE_RANK": "0",
            "PROCS_PER_NODE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
        }
    elif launcher == "torchrun":
        # The multi-node form (rendezvous), with one node: what a cluster launch runs on each node.
        cmd = [
            shutil.which("torchrun"),
            "--nnodes",
            "1",
            "--nproc_per_node",
            "2",
            "--rdzv_backend",
            "c10d",
            "--rdzv_endpoint",
            f"127.0.0.1:{free_port()}",
            MAIN,
        ]
    else:
        cmd = [sys.executable, MAIN]
    # PYTHONPATH: the processes import this checkout, whatever tree an editable install points at.
    env = {
        **os.environ,
        **extra_env,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    return cmd + overrides, env


def launch(
    launcher: str, overrides: list[str], timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    cmd, launch_env = launch_command(launcher, overrides)
    env = {**launch_env, **(env or {})}
    # A session of its own: a fault-injected crash kills the run's whole process group, not pytest.
    return subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, start_new_session=True
    )


def launch_and_signal(
    launcher: str,
    overrides: list[str],
    when: str,
    sig: int,
    to: str,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> tuple[int, str]:
    """Run like `launch`, and once a stdout line contains `when`, send `sig` `to` "every"
    process (launcher, ranks, loader workers: as Slurm does) or only the "launcher" (as
    Kubernetes signals PID 1); returns (exit code, stdout)."""
    import psutil

    cmd, launch_env = launch_command(launcher, overrides)
    env = {**launch_env, **(env or {})}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if when in line:
                started = psutil.Process(proc.pid)
                for process in [started, *(started.children(recursive=True) if to == "every" else [])]:
                    process.send_signal(sig)
                when = "\0"  # signal once
        return proc.wait(timeout=timeout), "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )
    return proc


def mlflow_run(run_dir: Path, uri: str | None = None):
    """The one MLflow run a training run recorded (default: the sqlite database in its run_dir)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri or f"sqlite:///{run_dir}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("whitebox-pretrain").experiment_id])
    return client, run


def metric_history(run_dir: Path, key: str = "loss", uri: str | None = None) -> dict[int, float]:
    """step -> logged value of metric `key`, read back from MLflow."""
    client, run = mlflow_run(run_dir, uri)
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}


@dataclass(frozen=True)
class S3:
    """A bucket on moto's S3 server, reached through s3fs like any object store."""

    endpoint: str
    bucket: str
    storage_options: dict

    def url(self, path: str) -> str:
        return f"s3://{self.bucket}/{path.lstrip('/')}"
