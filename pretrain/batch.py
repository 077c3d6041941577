"""A training batch: named tensors, the keyword arguments of the model's forward (input_ids or
images, and labels; document_ids, whose definition is here because data and models both use it).
Data makes them, tasks mix them, engines feed them to the model."""

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


def document_ids(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Which document of its block each token belongs to: (B, T) int64, 0 for the block's first
    document, +1 after each EOS (the EOS ends its document; the token after it starts the next).
    The models' `document_ids` batch key, with which no token attends across a document boundary."""
    after_eos = torch.zeros_like(input_ids, dtype=torch.int64)
    after_eos[:, 1:] = input_ids[:, :-1] == eos_id
    return after_eos.cumsum(dim=1)
