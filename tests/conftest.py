"""Shared test helpers: launching the real entry point as users do, and reading what it wrote."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MAIN = str(REPO / "pretrain" / "main.py")

# A model and batch small enough for a launcher run of a few steps to take seconds on 2 cores.
TINY = [
    "model.n_layer=2", "model.n_head=4", "model.n_embd=64", "model.seq_len=32",
    "train.global_batch_size=8", "train.micro_batch_size=2", "train.log_interval=1",
    "data.stdlib_max_mb=0.25", "data.blocks_per_shard=128",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: str, overrides: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run pretrain/main.py under `deepspeed`, `torchrun` (2 processes each) or plain `python`."""
    if launcher == "deepspeed":
        cmd = [shutil.which("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), MAIN]
    elif launcher == "torchrun":
        cmd = [shutil.which("torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), MAIN]
    else:
        cmd = [sys.executable, MAIN]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd + overrides, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    return proc


def metric_history(run_dir: Path, key: str = "loss") -> dict[int, float]:
    """step -> logged value of metric `key`, read back from the run's MLflow database."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("whitebox-pretrain").experiment_id])
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory) -> str:
    """One embedded-corpus cache for every end-to-end run of the session (prepared on first use)."""
    return str(tmp_path_factory.mktemp("corpus-cache"))
