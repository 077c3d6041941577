"""What a checkpoint holds, and which one a run resumes from.

A step holds the engine's native files (written collectively by every rank), each rank's data
position (`data_rank{r}.json`) and RNG state (`rng_rank{r}.pt`: python, numpy, torch), and a
manifest carrying the step, world size, engine, MLflow run id and the resolved config. Where the
files live and when a step counts as written is the store's business (store.py).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pretrain.checkpoint.store import CheckpointStore, DamagedCheckpoint
from pretrain.distributed import DistInfo
from pretrain.engines.base import Engine
from pretrain.errors import UserError

log = logging.getLogger("pretrain")


@dataclass(frozen=True)
class Restored:
    step: int
    data_state: dict[str, Any]
    manifest: dict[str, Any]


@dataclass(frozen=True)
class Retention:
    keep_last: int
    keep_every: int


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointManager:
    def __init__(self, store: CheckpointStore, dist_info: DistInfo, retention: Retention, commit_wait_s: float):
        self.store, self.dist = store, dist_info
        self.retention, self.commit_wait_s = retention, commit_wait_s

    def save(self, step: int, engine: Engine, data_state: dict[str, Any], record: dict[str, Any]) -> str:
        """Collective: every rank calls it with its own data state; returns the step's URL once
        committed. `record` (JSON) goes into the manifest."""
        staged = self.store.staging_dir(step)
        if self.dist.is_main:
            self.store.uncommit(step)
        if self.store.node.is_leader:
            shutil.rmtree(staged, ignore_errors=True)  # what a killed earlier attempt left
            os.makedirs(staged)
        dist.barrier()
        engine.save(staged)
        rank = self.dist.rank
        with open(os.path.join(staged, f"data_rank{rank}.json"), "w") as f:
            json.dump(data_state, f)
        torch.save(_rng_state(), os.path.join(staged, f"rng_rank{rank}.pt"))
        dist.barrier()
        self.store.upload(step)
        dist.barrier()
        if self.dist.is_main:
            self.store.commit(step, {**record, "world_size": self.dist.world_size}, self.commit_wait_s)
            deleted = self.store.retain(self.retention.keep_last, self.retention.keep_every)
            if deleted:
                log.info("checkpoint retention: deleted steps %s", ", ".join(map(str, deleted)))
        dist.barrier()
        return self.store.step_url(step)

    def restore(self, engine: Engine, step: int | None = None,
                check: Callable[[dict[str, Any]], None] | None = None) -> Restored | None:
        """Collective: load the newest committed step whose files verify (or exactly `step`).

        A damaged step is reported, naming the file, and the next older one is tried; with an
        explicit `step` it is an error. `check(manifest)` runs before anything is loaded and may
        refuse the step (UserError). None when there is nothing to resume from.
        """
        committed = self.store.committed_steps()
        if step is not None:
            if step not in committed:
                raise UserError(f"checkpoint.resume={step}: {self.store.step_url(step)} is not a committed "
                                f"checkpoint (committed: {committed or 'none'}); pick one of those, auto or none")
            committed = [step]
        for candidate in reversed(committed):
            directory, problem = self._fetch(candidate)
            if problem is None:
                return self._load(candidate, directory, engine, check)
            if step is not None:
                raise UserError(f"checkpoint.resume={step}: {problem}; resume from another step")
            log.warning("skipping damaged checkpoint: %s", problem)
        return None

    def _fetch(self, step: int) -> tuple[str, str | None]:
        """(local directory, None) when every node's leader has verified the step's files, else
        (_, what was wrong); every rank gets the same verdict."""
        directory, problem = "", None
        if self.store.node.is_leader:
            try:
                directory = self.store.fetch(step)
            except DamagedCheckpoint as exc:
                problem = str(exc)
        verdicts: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(verdicts, (directory, problem))
        problems = [p for _, p in verdicts if p is not None]
        leader = self.dist.rank - self.dist.local_rank  # this node's local rank 0
        return verdicts[leader][0], (problems[0] if problems else None)

    def _load(self, step: int, directory: str, engine: Engine, check: Callable[[dict[str, Any]], None] | None) -> Restored:
        manifest = self.store.manifest(step)
        if manifest["world_size"] != self.dist.world_size:
            raise UserError(f"checkpoint {self.store.step_url(step)} was written by {manifest['world_size']} ranks "
                            f"but this run has {self.dist.world_size}; resume with the same number of processes")
        if check is not None:
            check(manifest)
        engine.load(directory)
        rank = self.dist.rank
        with open(os.path.join(directory, f"data_rank{rank}.json")) as f:
            data_state = json.load(f)
        _set_rng_state(torch.load(os.path.join(directory, f"rng_rank{rank}.pt"), weights_only=False))
        dist.barrier()
        if self.store.node.is_leader and not self.store.is_local:
            shutil.rmtree(directory, ignore_errors=True)  # a downloaded copy, loaded by every rank now
        return Restored(step, data_state, manifest)
