"""Throughput, model FLOPs utilisation and memory, for the log line and MLflow."""

from __future__ import annotations

import logging
import re
import resource
import sys

import torch

log = logging.getLogger("pretrain")

# Dense (no 2:4 sparsity) bf16 tensor-core peak FLOP/s with fp32 accumulation, per GPU, keyed by
# the words of a model name as torch.cuda.get_device_name() gives it. Where a datasheet gives only
# the "with sparsity" figure, dense is half of it. A key's words match whole words, in order, other
# words between them allowed ("H100 PCIe" matches "NVIDIA H100 80GB PCIe"), and the first key that
# matches wins, so the more specific keys come first ("H100 PCIe" before "H100"). Whole words keep
# "A10" from matching "A100" or "A10G", "L4" from "L40S", "H200" from "GH200". A GPU that is not
# here (A10G, H20, H800, ...) gets no MFU, never a guessed peak: set train.peak_tflops.
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,  # NVIDIA H100 Tensor Core GPU datasheet, H100 PCIe: 1,513 TF with sparsity
    "H100 NVL": 835e12,  # same datasheet, H100 NVL (per GPU): 1,671 TF with sparsity
    "H100": 989e12,  # same datasheet, H100 SXM ("NVIDIA H100 80GB HBM3"): 1,979 TF with sparsity
    "H200 NVL": 835e12,  # NVIDIA H200 Tensor Core GPU datasheet, H200 NVL: 1,671 TF with sparsity
    "H200": 989e12,  # same datasheet, H200 SXM: 1,979 TF with sparsity
    "GH200": 989e12,  # NVIDIA GH200 Grace Hopper Superchip datasheet: 1,979 TF with sparsity
    "B200": 2250e12,  # NVIDIA HGX B200 datasheet: 36 PF FP16/BF16 with sparsity for 8 GPUs
    "A100": 312e12,  # NVIDIA A100 Tensor Core GPU datasheet: 312 TF dense, SXM4 and PCIe, 40 and 80 GB
    "A10": 125e12,  # NVIDIA A10 Tensor Core GPU datasheet: 125 TF (250 TF with sparsity)
    "L40S": 362e12,  # NVIDIA L40S datasheet: 362.05 TF (733 TF with sparsity)
    "L40": 181e12,  # NVIDIA L40 datasheet: 181.05 TF (362.1 TF with sparsity)
    "L4": 121e12,  # NVIDIA L4 Tensor Core GPU datasheet: 242 TF with sparsity
    "RTX 4090": 165.2e12,  # NVIDIA Ada Lovelace architecture whitepaper, RTX 4090: BF16 with FP32 accumulate
}
# Names that hold a key's words but are a smaller part: a MIG slice ("NVIDIA A100-SXM4-40GB MIG
# 1g.5gb") has a fraction of the GPU, a laptop RTX 4090 is another chip, the RTX 4090 D has fewer SMs.
SMALLER_PARTS = ("MIG", "Laptop", "Max-Q", "RTX 4090 D")


def _words(key: str) -> re.Pattern:
    """`key`'s words as whole words, in order, anything between them; case-insensitive."""
    return re.compile(".*".join(rf"(?<![A-Z0-9]){re.escape(w)}(?![A-Z0-9])" for w in key.upper().split()))


_PATTERNS = [(_words(key), flops) for key, flops in PEAK_BF16_FLOPS.items()]
_EXCLUDED = [_words(key) for key in SMALLER_PARTS]
_warned: set[tuple[str, str]] = set()


def bf16_peak_for_name(name: str) -> float | None:
    """The table's peak for a device name as torch.cuda.get_device_name() gives it, or None."""
    name = name.upper()
    if any(pattern.search(name) for pattern in _EXCLUDED):
        return None
    return next((flops for pattern, flops in _PATTERNS if pattern.search(name)), None)


def peak_flops(device: torch.device, precision: str, override_tflops: float | None = None) -> float | None:
    """The peak FLOP/s that MFU divides by: `override_tflops` (train.peak_tflops, a benchmark's
    --peak-tflops) whenever given, for any device and precision; otherwise the table's dense bf16
    peak for a bf16 run on a GPU it knows. fp32 has no table (whether matmuls use TF32 tensor cores
    is a setting, not the device's), and a CPU has no meaningful one: both need the override."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = bf16_peak_for_name(name) if precision == "bf16" else None
    if peak is None and (name, precision) not in _warned:
        _warned.add((name, precision))
        log.warning(
            "no peak FLOP/s known for %s in %s: MFU is not reported; set train.peak_tflops to the "
            "device's dense peak in TFLOP/s to report it",
            name,
            precision,
        )
    return peak


def memory_gib(device: torch.device) -> float:
    """Peak memory of this process: GPU allocations on CUDA, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)  # bytes on macOS, KiB on Linux


def mfu(tokens_per_s_per_rank: float, flops_per_token: float, peak: float | None) -> float | None:
    return None if peak is None else tokens_per_s_per_rank * flops_per_token / peak
