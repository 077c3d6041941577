"""Fixtures: the local services tests run against (moto's S3 server, an `mlflow server`) and
session-wide caches. Plain helpers live in helpers.py."""

from __future__ import annotations

import glob
import os
import time

import pytest
import torch

if not torch.cuda.is_available():
    # Without CUDA, the Triton kernels run in Triton's interpreter (tests/test_tssa_triton.py), which
    # @triton.jit chooses as it decorates a function, triton's own included: so before anything
    # imports triton (helpers does, through transformers and torch.utils.flop_counter).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import S3, MlflowServer  # noqa: E402

from pretrain.distributed import SHM_BUFFERS, DistInfo, free_port, init_distributed, shutdown, single_process_env
from pretrain.prepare.text import write_token_shards

LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked gpu are skipped, saying why, on a machine without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is False on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config: pytest.Config) -> str:
    gpus = torch.cuda.device_count()
    if gpus == 0:
        return "GPUs: none; tests marked gpu are skipped, and every rank runs on CPU with gloo"
    return (
        f"GPUs: {gpus}; a test with more ranks than GPUs runs them all on CPU with gloo (CUDA hidden from "
        "its processes), so no rank asks for a GPU that is not there"
    )


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


@pytest.fixture(scope="module")
def one_rank() -> DistInfo:
    """A process group of this process alone, as a plain `python` run makes; the environment it
    needs is put back afterwards, so that launchers started by other tests do not inherit it."""
    saved = {k: os.environ.get(k) for k in LAUNCHER_ENV}
    os.environ.update(single_process_env())
    try:
        yield init_distributed()
    finally:
        shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def text_shards(tmp_path_factory) -> list[str]:
    """Small train and validation shard sets: the data.urls and data.val_urls of a run."""
    root = tmp_path_factory.mktemp("text")
    overrides = []
    for split, key, n in (("train", "data.urls", 2000), ("val", "data.val_urls", 200)):
        documents = [f"step {i}: the {i % 7} cats saw {i % 11} dogs and {i % 3} birds." for i in range(n)]
        index = write_token_shards(documents, str(root / split), block_len=33, blocks_per_shard=64)
        overrides.append(f'{key}="{root / split}/shard-{{000000..{len(index["shards"]) - 1:06d}}}.tar"')
    return ["data=shards", *overrides]
