"""What a checkpoint holds, and which one a run resumes from.

A step holds the engine's native files (written collectively by every rank), those of any other
trained state the run keeps beside it (the weight average: pretrain/ema.py), each rank's data
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
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from pretrain.checkpoint.store import CheckpointStore, DamagedCheckpoint
from pretrain.distributed import DistInfo, any_rank, sum_over_ranks
from pretrain.engines.base import Engine
from pretrain.errors import UserError
from pretrain.faults import crash_point

log = logging.getLogger("pretrain")


class Checkpointable(Protocol):
    """Saves and loads its own files in a step directory, collectively (as an Engine does)."""

    def save(self, step_dir: str) -> None: ...

    def load(self, step_dir: str, saved_world_size: int) -> None: ...


@dataclass(frozen=True)
class Restored:
    step: int
    data_states: list[dict[str, Any]]  # every saving rank's, in rank order
    manifest: dict[str, Any]
    resharded: bool  # written by another number of ranks: the RNG state was not restored


@dataclass(frozen=True)
class SavePolicy:
    """checkpoint.* knobs on how a save proceeds once the files are staged."""

    keep_last: int
    keep_every: int
    commit_wait_s: float
    async_upload: bool
    on_upload_error: str  # one of UPLOAD_ERROR_MODES


UPLOAD_ERROR_MODES = ("continue", "fail")


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


# The run stopped, at its end or on a preemption notice, without committing its last step: not
# 0 (success) and not 75 (requeue), which would restart a run that cannot save, from older state.
NOT_COMMITTED_EXIT_CODE = 3


class NotCommitted(Exception):
    """The checkpoint of the run's last step was not committed; the message says why and where a
    restart would begin."""


class CheckpointManager:
    """Saves and restores through a CheckpointStore. A save blocks training only while the files
    are staged; the upload and commit run in a background thread (with `async_upload`), at most
    one at a time: the next save, and the end of the run, wait for it."""

    def __init__(self, store: CheckpointStore, dist_info: DistInfo, policy: SavePolicy):
        if policy.on_upload_error not in UPLOAD_ERROR_MODES:
            raise UserError(
                f"checkpoint.on_upload_error={policy.on_upload_error!r} is not one of {', '.join(UPLOAD_ERROR_MODES)}"
            )
        self.store, self.dist, self.policy = store, dist_info, policy
        self._upload: threading.Thread | None = None
        self._failure: str | None = None
        self._save_seconds: dict[int, float] = {}  # committed step -> seconds from staging to commit
        self.saved: list[int] = []  # steps this run began to save
        self.failed: list[int] = []  # steps whose upload or commit failed on this rank

    def save(
        self,
        step: int,
        engine: Engine,
        data_state: dict[str, Any],
        record: dict[str, Any],
        extras: Sequence[Checkpointable] = (),
    ) -> float:
        """Collective: every rank calls it with its own data state; `record` (JSON) goes into
        the manifest; `extras` save beside the engine. Returns the seconds training was blocked
        (waiting for the previous upload, then staging)."""
        started = time.perf_counter()
        self.wait()
        self.saved.append(step)
        staged = self.store.staging_dir(step)
        attempt = [uuid.uuid4().hex]
        dist.broadcast_object_list(attempt, src=0)  # names this save's upload records on every node
        if self.store.node.is_leader:
            shutil.rmtree(staged, ignore_errors=True)  # what a killed earlier attempt left
            os.makedirs(staged)
        dist.barrier()
        for part in (engine, *extras):
            part.save(staged)
        rank = self.dist.rank
        with open(os.path.join(staged, f"data_rank{rank}.json"), "w") as f:
            json.dump(data_state, f)
        torch.save(_rng_state(), os.path.join(staged, f"rng_rank{rank}.pt"))
        dist.barrier()
        crash_point("save.staged", step)
        record = {**record, "world_size": self.dist.world_size}
        if self.policy.async_upload:
            self._upload = threading.Thread(
                target=self._upload_and_commit,
                args=(step, attempt[0], record, started),
                name=f"checkpoint-upload-{step}",
                daemon=True,
            )
            self._upload.start()
        else:
            self._upload_and_commit(step, attempt[0], record, started)
            self.wait()
        return time.perf_counter() - started

    def wait(self) -> None:
        """Block until the upload in flight, if any, has committed or failed. A failure stops the
        run under on_upload_error=fail."""
        if self._upload is not None:
            self._upload.join()
            self._upload = None
        if self._failure is not None and self.policy.on_upload_error == "fail":
            raise UserError(f"{self._failure} (checkpoint.on_upload_error=fail; set it to continue to train on)")

    def committed_save_seconds(self) -> dict[int, float]:
        """Steps committed since the last call, with how long each save took end to end (rank 0)."""
        done, self._save_seconds = self._save_seconds, {}
        return done

    def _upload_and_commit(self, step: int, attempt: str, record: dict[str, Any], started: float) -> None:
        """Without collectives, so that it can run beside training, and the only part of a save
        that touches the store, so that a store outage never stalls training: node leaders
        upload, rank 0 waits for every node's record of its upload, then commits and applies
        retention."""
        self._failure = None
        try:
            if self.dist.is_main:
                self.store.uncommit(step)
            self.store.upload(step, attempt)
            if self.dist.is_main:
                self.store.commit(step, attempt, record, self.policy.commit_wait_s)
                self._save_seconds[step] = time.perf_counter() - started
                log.info("checkpoint committed: %s (%.1f s)", self.store.step_url(step), self._save_seconds[step])
        except Exception as exc:  # the thread's boundary: whatever the store raised (botocore's connection
            # errors are not OSErrors) must be reported, not end the thread unseen
            self._failure = (
                f"checkpoint step {step} was not committed: {type(exc).__name__}: {' '.join(str(exc).split())}"
            )
            self.failed.append(step)
            log.error("%s", self._failure)
            self._discard(step)
            return
        if self.dist.is_main:
            self._retain(step)

    def _retain(self, step: int) -> None:
        """After a commit: a failure here leaves old steps behind, which the next commit retries;
        the step just committed stands."""
        try:
            crash_point("retention", step)
            deleted = self.store.retain(self.policy.keep_last, self.policy.keep_every)
        except Exception as exc:
            log.warning("checkpoint retention failed (old steps are kept): %s: %s", type(exc).__name__, exc)
            return
        if deleted:
            log.info("checkpoint retention: deleted steps %s", ", ".join(map(str, deleted)))

    def _discard(self, step: int) -> None:
        """A failed attempt's files, so that they do not pile up on a full disk: the staged copy
        (node leader) and what reached the store (rank 0; retention would remove it later)."""
        if self.store.node.is_leader:
            shutil.rmtree(self.store.staging_dir(step), ignore_errors=True)
        if self.dist.is_main:
            try:
                self.store.discard(step)
            except Exception as exc:  # the store may be what failed: leave the rest to retention
                log.warning("could not remove the files of uncommitted step %d: %s", step, exc)

    def check_writable(self) -> None:
        """Collective, before training: a store that cannot take a file is found now, not at the
        first save (rank 0 and every node leader, the ranks that write to it, try one)."""
        problem = None
        if self.dist.is_main or self.store.node.is_leader:
            try:
                self.store.probe()
            except Exception as exc:  # whatever the store raises, botocore's errors included
                problem = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        if any_rank(problem is not None):
            raise UserError(
                f"checkpoint.url {self.store.url} is not writable ({problem or 'from another node'}): fix its "
                "permissions, space or checkpoint.storage_options, or set checkpoint.url to a writable place"
            )

    def committed(self, step: int) -> bool:
        """Collective, after the upload in flight: whether `step` is committed in the store."""
        self.wait()
        missing = self.dist.is_main and step not in self.store.committed_steps()
        return not any_rank(missing)

    def failed_saves(self) -> int:
        """Collective: saves of this run that did not commit, as rank 0 (which commits) saw them."""
        return round(sum_over_ranks(len(self.failed) if self.dist.is_main else 0))

    def newest_committed(self) -> int | None:
        committed = self.store.committed_steps()
        return committed[-1] if committed else None

    def restore(
        self,
        engine: Engine,
        step: int | None = None,
        check: Callable[[dict[str, Any]], None] | None = None,
        extras: Sequence[Checkpointable] = (),
    ) -> Restored | None:
        """Collective: load the newest committed step whose files verify (or exactly `step`).

        A damaged step is reported, naming the file, and the next older one is tried; with an
        explicit `step` it is an error. `check(manifest)` runs before anything is loaded and may
        refuse the step (UserError). None when there is nothing to resume from.
        """
        committed = self.store.committed_steps()
        if step is not None:
            if step not in committed:
                raise UserError(
                    f"checkpoint.resume={step}: {self.store.step_url(step)} is not a committed "
                    f"checkpoint (committed: {committed or 'none'}); pick one of those, auto or none"
                )
            committed = [step]
        for candidate in reversed(committed):
            directory, problem = self._fetch(candidate)
            if problem is None:
                return self._load(candidate, directory, (engine, *extras), check)
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

    def _load(
        self, step: int, directory: str, parts: Sequence[Checkpointable], check: Callable[[dict[str, Any]], None] | None
    ) -> Restored:
        manifest = self.store.manifest(step)
        if check is not None:
            check(manifest)
        saved_world = manifest["world_size"]
        for part in parts:
            part.load(directory, saved_world)
        data_states = []
        for saved_rank in range(saved_world):
            with open(os.path.join(directory, f"data_rank{saved_rank}.json")) as f:
                data_states.append(json.load(f))
        resharded = saved_world != self.dist.world_size
        if not resharded:  # per-rank RNG streams exist for the ranks that wrote them only
            _set_rng_state(torch.load(os.path.join(directory, f"rng_rank{self.dist.rank}.pt"), weights_only=False))
        dist.barrier()
        if self.store.node.is_leader and not self.store.is_local:
            shutil.rmtree(directory, ignore_errors=True)  # a downloaded copy, loaded by every rank now
        return Restored(step, data_states, manifest, resharded)
