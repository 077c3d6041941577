"""The training loop's hooks: everything a run does around a step besides taking it.

The loop (pretrain/trainer.py) steps the engine and writes checkpoints. What else happens at a
step boundary is a Callback, assembled by the trainer from the config: the weight average
(ema.py), the non-finite guard (guard.py), the spike detector (spikes.py), the log and metrics (tracking/progress.py),
evaluation (tasks.py), the white-box plot (whitebox.py), preemption (preemption.py) and, in
tests only, fault injection (faults.py). Callbacks run in the order the trainer lists them, and
talk to the loop only through the LoopState they are handed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pretrain.checkpoint.manager import Checkpointable, CheckpointManager
    from pretrain.config import Config
    from pretrain.data.loader import ShardLoader
    from pretrain.distributed import DistInfo
    from pretrain.engines.base import Engine, StepResult
    from pretrain.tasks import Task
    from pretrain.tracking.mlflow import Tracker


@dataclass
class LoopState:
    """What the loop and its callbacks share: the run's parts, where it stands, and what the
    callbacks ask of the loop."""

    cfg: Config
    dist: DistInfo
    engine: Engine
    task: Task
    data: ShardLoader
    checkpoints: CheckpointManager
    tracker: Tracker
    run_id: str | None
    callbacks: Callbacks
    step: int  # optimizer steps taken, the one just finished included
    tokens_seen: int  # by the model's current state: kept in checkpoints, as the batch size may change
    tokens_per_step: int
    last_loss: float = math.nan  # the last logged loss, mean over ranks
    # Requests to the loop, set by callbacks:
    reload_requested: str | None = None  # why the step does not stand: reload the newest committed checkpoint
    saves_held: bool = False  # no scheduled save now (a streak of skipped steps: a reload wants the one before)
    stop_requested: bool = False  # save after this step and leave the loop (a preemption notice)

    @property
    def at_end(self) -> bool:
        return self.step == self.cfg.train.max_steps


class Callback:
    """Every hook does nothing until a subclass overrides it. Hooks that run collectives must be
    called on every rank alike, which the loop does."""

    def on_fit_start(self, loop: LoopState) -> None:
        """Once the run is set up (restored, tracked) and before its first step."""

    def on_step_start(self, loop: LoopState) -> None:
        """Before the engine takes step `loop.step + 1`."""

    def accept_update(self, loop: LoopState, loss: float) -> bool:
        """Collective, on every rank alike: before step `loop.step + 1` updates the weights, with
        this rank's loss of it; False withholds the update (see Engine.train_step)."""
        return True

    def on_step_end(self, loop: LoopState, result: StepResult) -> None:
        """After step `loop.step` (counted already). Setting `loop.reload_requested` (to why)
        withdraws the step: the callbacks after this one do not see it."""

    def on_eval(self, loop: LoopState, metrics: dict[str, float]) -> None:
        """After an evaluation; callbacks earlier in the list may have added to `metrics`."""

    def on_save(self, loop: LoopState, blocked_s: float) -> None:
        """After a checkpoint was staged (its upload may still run); `blocked_s` is how long
        training waited for it."""

    def on_fit_end(self, loop: LoopState) -> None:
        """After the last step, once its checkpoint is committed; also after a stop request."""

    def interval_metrics(self) -> dict[str, float]:
        """Counters this callback adds to every logged step interval (e.g. skipped steps)."""
        return {}

    def checkpointables(self) -> Sequence[Checkpointable]:
        """State this callback keeps that checkpoints must hold beside the engine's."""
        return ()


@dataclass
class Callbacks:
    """The run's callbacks, called in order."""

    items: list[Callback] = field(default_factory=list)

    def on_fit_start(self, loop: LoopState) -> None:
        for callback in self.items:
            callback.on_fit_start(loop)

    def on_step_start(self, loop: LoopState) -> None:
        for callback in self.items:
            callback.on_step_start(loop)

    def accept_update(self, loop: LoopState, loss: float) -> bool:
        return all([callback.accept_update(loop, loss) for callback in self.items])  # every one: collectives

    def judges_updates(self) -> bool:
        """Whether any callback may withhold an update. If none does, the engine is not asked, and
        need not read the step's loss on the host before it updates (a GPU sync fewer)."""
        return any(type(callback).accept_update is not Callback.accept_update for callback in self.items)

    def on_step_end(self, loop: LoopState, result: StepResult) -> None:
        for callback in self.items:
            callback.on_step_end(loop, result)
            if loop.reload_requested:  # the step is withdrawn: later callbacks must not log or act on it
                return

    def on_eval(self, loop: LoopState, metrics: dict[str, float]) -> None:
        for callback in self.items:
            callback.on_eval(loop, metrics)

    def on_save(self, loop: LoopState, blocked_s: float) -> None:
        for callback in self.items:
            callback.on_save(loop, blocked_s)

    def on_fit_end(self, loop: LoopState) -> None:
        for callback in self.items:
            callback.on_fit_end(loop)

    def interval_metrics(self) -> dict[str, float]:
        return {k: v for callback in self.items for k, v in callback.interval_metrics().items()}

    def checkpointables(self) -> list[Checkpointable]:
        return [part for callback in self.items for part in callback.checkpointables()]
