"""Batches from a ShardStream, resumable on any layout of ranks and loader workers.

A plain DataLoader without auto-batching: the stream's workers make whole micro-batches, and
the DataLoader takes them from its workers in turn, which is the order the stream's reader
cycle assumes. Each micro-batch travels with its reader's (lane and source) position, so the
record of what training consumed is exact however far the workers have read ahead.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from torch.utils.data import DataLoader

from pretrain.batch import Batch
from pretrain.data.shards import ShardStream, WorkerFailure
from pretrain.errors import UserError


def _as_is(item: Any) -> Any:
    return item


class ShardLoader(DataLoader):
    def __init__(
        self,
        stream: ShardStream,
        num_workers: int,
        finish: Callable[[dict], Batch] | None = None,
        worker_init: Callable[[int], None] | None = None,
    ) -> None:
        """num_workers: 0 reads in this process; N >= 1 starts N worker processes. `finish` turns
        each micro-batch into what training takes, in the training process; `worker_init` runs
        first in each worker."""
        super().__init__(
            stream, batch_size=None, num_workers=num_workers, collate_fn=_as_is, worker_init_fn=worker_init
        )
        self.stream = stream
        self._finish = finish
        # Text's: the shards' tokenizer identity and the URL of its files, which checkpoints record
        # (set by build_text_loader); None for other data.
        self.tokenizer: dict | None = None

    def __iter__(self) -> Generator[Batch, None, None]:
        """From the last micro-batch consumed on (workers start from the stream's record); a
        finite stream (evaluation) from its start, every time. Close the iterator when done
        with it: that stops the workers."""
        batches = super().__iter__()
        try:
            for batch, (lane, source, position) in batches:
                if isinstance(batch, WorkerFailure):
                    raise UserError(batch.message)
                if self.stream.epochs is None:
                    self.stream.consumed(lane, source, position)
                yield batch if self._finish is None else self._finish(batch)
        finally:
            # Workers ignore the preemption signals, SIGTERM included, so multiprocessing's exit
            # handler cannot stop them and would wait for them forever: stop them when this ends.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)

    def source_samples(self) -> dict[str, int]:
        """Samples each source has given training so far, over all ranks (source name -> samples)."""
        batches = self.stream.source_batches()
        return {s.name: n * self.stream.batch_size for s, n in zip(self.stream.sources, batches, strict=True)}

    def skipped_samples(self) -> int:
        """Bad samples skipped so far under data.on_error=skip (0 under raise)."""
        return self.stream.skipped()
