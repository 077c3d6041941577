"""Shared test helpers: launching the real entry point as users do, and reading what it wrote."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pretrain.distributed import SHM_BUFFERS, free_port

REPO = Path(__file__).resolve().parent.parent
MAIN = str(REPO / "pretrain" / "main.py")

# A model and batch small enough for a launcher run of a few steps to take seconds on 2 cores.
TINY = [
    "model.n_layer=2", "model.n_head=4", "model.n_embd=64", "model.seq_len=32",
    "train.global_batch_size=8", "train.micro_batch_size=2", "train.log_interval=1",
    "data.stdlib_max_mb=0.25", "data.samples_per_shard=128",
]


def launch_command(launcher: str, overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that run pretrain/main.py under `deepspeed`, `torchrun`
    (2 processes each), the cluster templates' per-node launcher (`node`) or plain `python`."""
    extra_env: dict[str, str] = {}
    if launcher == "deepspeed":
        cmd = [shutil.which("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), MAIN]
    elif launcher == "node":  # the cluster templates' per-node launcher, as one node of two ranks
        cmd = [str(REPO / "cluster" / "launch_node.sh")]
        extra_env = {"NNODES": "1", "NODE_RANK": "0", "PROCS_PER_NODE": "2", "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": str(free_port())}
    elif launcher == "torchrun":
        # The multi-node form (rendezvous), with one node: what a cluster launch runs on each node.
        cmd = [shutil.which("torchrun"), "--nnodes", "1", "--nproc_per_node", "2", "--rdzv_backend", "c10d",
               "--rdzv_endpoint", f"127.0.0.1:{free_port()}", MAIN]
    else:
        cmd = [sys.executable, MAIN]
    # PYTHONPATH: the processes import this checkout, whatever tree an editable install points at.
    env = {**os.environ, **extra_env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return cmd + overrides, env


def launch(launcher: str, overrides: list[str], timeout: float = 300,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd, launch_env = launch_command(launcher, overrides)
    env = {**launch_env, **(env or {})}
    # A session of its own: a fault-injected crash kills the run's whole process group, not pytest.
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                          start_new_session=True)


def launch_and_signal(launcher: str, overrides: list[str], when: str, sig: int, to: str,
                      env: dict[str, str] | None = None, timeout: float = 300) -> tuple[int, str]:
    """Run like `launch`, and once a stdout line contains `when`, send `sig` `to` "every"
    process (launcher, ranks, loader workers: as Slurm does) or only the "launcher" (as
    Kubernetes signals PID 1); returns (exit code, stdout)."""
    import psutil

    cmd, launch_env = launch_command(launcher, overrides)
    env = {**launch_env, **(env or {})}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
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
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
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


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory) -> str:
    """One embedded-corpus cache for every end-to-end run of the session (prepared on first use)."""
    return str(tmp_path_factory.mktemp("corpus-cache"))


@pytest.fixture(scope="session", autouse=True)
def no_leaked_shm_buffers():
    """Ranks killed on purpose (fault injection, preemption) cannot unlink DeepSpeed's 66 MB
    shared-memory buffers: remove those the session made, so repeated runs do not fill /dev/shm."""
    started = time.time()
    yield
    for path in glob.glob(SHM_BUFFERS.format(addr="*", port="*", rank="*")):
        if os.stat(path).st_mtime >= started:
            os.remove(path)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """A real `mlflow server` on 127.0.0.1 with its own sqlite store; yields its URI."""
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    server = subprocess.Popen(
        [shutil.which("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--default-artifact-root", f"file://{root}/artifacts"],
        cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail("mlflow server did not start within 60 s")
            time.sleep(0.25)
    yield uri
    server.terminate()
    server.wait(timeout=30)


@dataclass(frozen=True)
class S3:
    """A bucket on moto's S3 server, reached through s3fs like any object store."""

    endpoint: str
    bucket: str
    storage_options: dict

    def url(self, path: str) -> str:
        return f"s3://{self.bucket}/{path.lstrip('/')}"


@pytest.fixture(scope="session")
def s3() -> S3:
    """moto's S3-compatible server on 127.0.0.1 (a real HTTP server, in a thread of this process)."""
    import s3fs
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    s3fs.S3FileSystem(**options).mkdir("whitebox-test")
    yield S3(endpoint, "whitebox-test", options)
    server.stop()
