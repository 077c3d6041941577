"""Fixtures: the local services tests run against (moto's S3 server, an `mlflow server`) and
session-wide caches. Plain helpers live in helpers.py."""

from __future__ import annotations

import glob
import os
import time

import pytest
import torch
from helpers import S3, MlflowServer

from pretrain.distributed import SHM_BUFFERS, free_port


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked gpu are skipped, saying why, on a machine without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is False on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server.uri
    server.stop()


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
