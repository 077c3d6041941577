"""Batches from a ShardStream, resumable with loader workers.

torchdata's StatefulDataLoader does the part that is hard to hand-roll: it snapshots every
worker's dataset state together with which worker yields next, and restores both, so a run
restarted with the same number of workers yields the same batches in the same order.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

from torchdata.stateful_dataloader import StatefulDataLoader

from pretrain.data.shards import ShardStream

Batch = dict[str, Any]
# torchdata calls a deprecated torch function on every loader start; the warning is not ours to act on.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)


class ShardLoader(StatefulDataLoader):
    def __init__(self, stream: ShardStream, batch_size: int, num_workers: int,
                 collate: Callable[[list[Batch]], Batch] | None = None,
                 finish: Callable[[Batch], Batch] | None = None,
                 worker_init: Callable[[int], None] | None = None) -> None:
        """num_workers: 0 reads in this process; N >= 1 starts N worker processes. `collate`
        batches samples in the worker (default: torch's, stacking into tensors); `finish` turns
        each batch into what training takes, in the training process; `worker_init` runs first
        in each worker."""
        super().__init__(stream, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                         worker_init_fn=worker_init)
        self._in_process = num_workers == 0
        self._finish = finish

    def __iter__(self) -> Iterator[Batch]:
        batches = super().__iter__()
        return batches if self._finish is None else map(self._finish, batches)

    def reader_states(self) -> list[dict[str, Any]]:
        """Each reader's ShardStream state, as of the last batch yielded."""
        state = self.state_dict()
        if self._in_process:
            return [state["dataset_state"]] if state.get("dataset_state") else []
        workers = state.get("_snapshot", {}).get("_worker_snapshots", {})
        return [w["dataset_state"] for w in workers.values() if w.get("dataset_state")]

    def skipped_samples(self) -> int:
        """Bad samples skipped so far under data.on_error=skip (0 under raise)."""
        return sum(s["skipped"] for s in self.reader_states())
