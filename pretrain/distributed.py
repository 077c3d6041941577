"""Process-group setup that works the same under deepspeed, torchrun and plain python.

Ranks come from the environment (RANK, WORLD_SIZE, LOCAL_RANK, as both launchers set them);
a plain `python` run becomes a world of one on a free local port, so every engine can assume an
initialised process group.
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pretrain.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop the `--local_rank=N` (or `--local_rank N`) the DeepSpeed launcher appends.

    Hydra would reject it as an override; the same number is in LOCAL_RANK anyway.
    """
    kept: list[str] = []
    skip_next = False
    for arg in argv:
        if skip_next:
            skip_next = False
        elif arg in ("--local_rank", "--local-rank"):
            skip_next = True
        elif not arg.startswith(("--local_rank=", "--local-rank=")):
            kept.append(arg)
    return kept


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env() -> dict[str, str]:
    """The launcher's variables for a world of one, as a plain `python` run needs them."""
    return {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }


# A process's environment to run on CPU with gloo on a machine with GPUs: CUDA hidden from torch,
# and DeepSpeed's accelerator (and launcher) on CPU, which would otherwise look for GPUs of its own.
CPU_ONLY_ENV = {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}


def too_few_gpus(ranks: int) -> bool:
    """Whether this machine has GPUs, but fewer than `ranks` local processes: such a local world
    runs on CPU (`CPU_ONLY_ENV`) rather than one process asking CUDA for a GPU it does not have."""
    return 0 < torch.cuda.device_count() < ranks


def gpu_for_rank(local_rank: int, gpus: int) -> int:
    """The GPU of the process with `local_rank` on a node where torch sees `gpus`: its local rank,
    which must name one; more processes than GPUs would fail in CUDA with a message naming neither."""
    if local_rank >= gpus:
        raise UserError(
            f"local rank {local_rank} has no GPU: torch sees {gpus} on this node; start at most {gpus} processes "
            f"per node (deepspeed --num_gpus {gpus}, torchrun --nproc-per-node {gpus}), or hide the GPUs "
            "(CUDA_VISIBLE_DEVICES=) to run every rank on CPU with gloo"
        )
    return local_rank


def init_distributed(timeout_s: float | None = None) -> DistInfo:
    """Initialise the default process group (NCCL on GPU, gloo on CPU) and pick the device; a
    collective that waits longer than `timeout_s` (default: torch's) fails."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(single_process_env())
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # torchrun says LOCAL_WORLD_SIZE, the DeepSpeed launcher LOCAL_SIZE.
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))

    if torch.cuda.is_available():
        gpu = gpu_for_rank(local_rank, torch.cuda.device_count())
        torch.cuda.set_device(gpu)
        device, backend = torch.device("cuda", gpu), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size))
    if not dist.is_initialized():
        timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout)
    return DistInfo(rank, world_size, local_rank, local_world_size, device)


def shutdown() -> None:
    if dist.is_initialized():
        rank = dist.get_rank()
        dist.destroy_process_group()
        remove_shm_buffers(rank)


# DeepSpeed's CPU all-reduce (its shm comm op) maps a 66 MB file per rank under /dev/shm, named
# after the rendezvous, and never unlinks it: every CPU run would leave 132 MB per rank pair.
SHM_BUFFERS = "/dev/shm/deepspeed_allreduce_buffer_*_{addr}_{port}_{rank}"


def remove_shm_buffers(rank: int) -> None:
    """Unlink this rank's DeepSpeed shared-memory buffers (safe once its process group is gone:
    a mapping outlives its name)."""
    pattern = SHM_BUFFERS.format(
        addr=os.environ.get("MASTER_ADDR", "*"), port=os.environ.get("MASTER_PORT", "*"), rank=rank
    )
    for path in glob.glob(pattern):
        with contextlib.suppress(OSError):
            os.remove(path)


# Collectives on single values, for decisions every rank must take alike (stop, evaluate on) and
# for figures that describe the whole run (mean loss, skipped samples).


def _collective_device() -> torch.device:
    """Where a collective's tensors live: the current GPU under NCCL, the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """Collective: whether `flag` is true on at least one rank."""
    t = torch.tensor([flag], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def sum_over_ranks(value: float) -> float:
    """Collective: the sum of every rank's `value` (in float64)."""
    t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.item()


def mean_over_ranks(value: float) -> float:
    """Collective: the mean of every rank's `value`."""
    return sum_over_ranks(value) / dist.get_world_size()


def mean_over_reporting_ranks(values: dict[str, float]) -> dict[str, float]:
    """Collective: each key's mean over the ranks whose `values` are not empty (a rank may have had
    nothing to measure, e.g. no validation data); the first reporting rank's keys."""
    gathered: list[dict[str, float]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, values)
    reported = [v for v in gathered if v]
    return {k: sum(v[k] for v in reported) / len(reported) for k in (reported[0] if reported else {})}
