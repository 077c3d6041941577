"""Throughput, model FLOPs utilisation and memory, for the log line and MLflow."""

from __future__ import annotations

import resource
import sys

import torch

# Dense bf16 peak FLOP/s by device-name substring. An unknown device gets no MFU rather than a
# wrong one.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
}


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's dense peak for `precision`; known for bf16 on the GPUs in the table only."""
    if device.type != "cuda" or precision != "bf16":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def memory_gib(device: torch.device) -> float:
    """Peak memory of this process: GPU allocations on CUDA, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)  # bytes on macOS, KiB on Linux


def mfu(tokens_per_s_per_rank: float, flops_per_token: float, peak: float | None) -> float | None:
    return None if peak is None else tokens_per_s_per_rank * flops_per_token / peak
