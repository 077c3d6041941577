"""A training batch: named tensors, the keyword arguments of the model's forward (input_ids or
images, and labels). Data makes them, tasks mix them, engines feed them to the model."""

from __future__ import annotations

from collections.abc import Iterator

import torch

Batch = dict[str, torch.Tensor]


def pinned(batches: Iterator[Batch]) -> Iterator[Batch]:
    """Each batch in page-locked memory, for a GPU run: the engines' `to(device, non_blocking=True)`
    then returns at once, where a copy from pageable memory would wait for the GPU's queued work.
    Pinned here, at the end, because tasks make new tensors after the loader (tokens split into
    inputs and labels, images mixed)."""
    for batch in batches:
        yield {k: v.pin_memory() for k, v in batch.items()}
