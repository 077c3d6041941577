"""Run a function on a local world of N processes with a real process group (gloo on CPU).

For tests and benchmarks that drive engines directly: each process gets RANK / WORLD_SIZE /
MASTER_* like a launcher would set, calls `fn(dist_info, *args)`, and the return values come
back to the caller in rank order. An exception in any rank fails the whole call with its
traceback.
"""

from __future__ import annotations

import io
import logging
import os
import queue
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from pretrain.distributed import CPU_ONLY_ENV, free_port, init_distributed, shutdown, too_few_gpus

log = logging.getLogger("pretrain")


def _worker(rank: int, world_size: int, port: int, on_cpu: bool, fn: Callable, args: tuple, results: mp.Queue) -> None:
    if on_cpu:  # before CUDA starts in this process, which reads it once
        os.environ.update(CPU_ONLY_ENV)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        dist_info = init_distributed()
        try:
            # As bytes: tensors put on a queue would live in this process's shared memory,
            # which is gone once it exits, possibly before the caller reads them.
            buffer = io.BytesIO()
            torch.save(fn(dist_info, *args), buffer)
            results.put((rank, buffer.getvalue(), None))
        finally:
            shutdown()
    except BaseException:
        results.put((rank, None, traceback.format_exc()))


def run_local_world(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 900) -> list[Any]:
    """`fn(dist_info, *args)` on `world_size` local processes; returns their results by rank. With
    fewer GPUs than processes (a world of 2 on a one-GPU machine), every process runs on CPU with
    gloo, which is said in the log, rather than one of them asking CUDA for a GPU it does not have."""
    on_cpu = too_few_gpus(world_size)
    if on_cpu:
        log.warning(
            "a local world of %d processes runs on CPU with gloo: torch sees %d GPU(s)",
            world_size,
            torch.cuda.device_count(),
        )
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, on_cpu, fn, args, results)) for r in range(world_size)
    ]
    for p in procs:
        p.start()
    by_rank: dict[int, Any] = {}
    try:
        for _ in range(world_size):
            rank, value, error = results.get(timeout=timeout_s)
            if error:
                raise RuntimeError(f"rank {rank} failed:\n{error}")
            by_rank[rank] = torch.load(io.BytesIO(value), weights_only=False)
    except queue.Empty:
        raise TimeoutError(f"local world of {world_size} did not finish within {timeout_s} s") from None
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [by_rank[r] for r in range(world_size)]
