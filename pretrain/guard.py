"""What a run does about steps with a non-finite loss or gradient norm.

The engine skips such a step (no update, on every rank alike) where it can; this guard counts
these bad steps and, when `reload_after` come in a row, says that the last checkpoint should be
reloaded: a streak usually means the weights themselves went bad (and where a step could not
be skipped, they did). The data stream is not rewound on a reload, so the batches of the streak
are not met again. After `max_reloads` reloads the run gives up.
"""

from __future__ import annotations

import logging

from pretrain.callbacks import Callback, LoopState
from pretrain.engines.base import StepResult
from pretrain.errors import UserError

log = logging.getLogger("pretrain")


class NonFiniteGuard(Callback):
    def __init__(self, reload_after: int, max_reloads: int, is_main: bool) -> None:
        if reload_after < 1 or max_reloads < 0:
            raise UserError(
                f"train.bad_steps_to_reload={reload_after} must be >= 1 and train.max_reloads={max_reloads} >= 0"
            )
        self.reload_after, self.max_reloads, self.is_main = reload_after, max_reloads, is_main
        self.skipped = 0  # bad steps since this process started
        self.reloads = 0
        self.in_a_row = 0

    def on_step_end(self, loop: LoopState, result: StepResult) -> None:
        if self.reload_due(loop.step, result):
            loop.reload_requested = f"{self.reload_after} steps in a row with a non-finite loss or gradient norm"
        loop.saves_held = self.in_a_row > 0

    def interval_metrics(self) -> dict[str, float]:
        return {"steps_skipped": self.skipped, "reloads": self.reloads}

    def reload_due(self, step: int, result: StepResult) -> bool:
        """Record `step`'s outcome; True when the last checkpoint should be reloaded now. Raises
        UserError when a streak comes after the last reload allowed."""
        if not result.bad:
            self.in_a_row = 0
            return False
        self.skipped += 1
        self.in_a_row += 1
        if self.is_main:
            log.warning(
                "step %d %s: gradient norm %s (%d in a row; a reload after %d)",
                step,
                "skipped" if result.skipped else "applied, no skip on this engine",
                result.grad_norm,
                self.in_a_row,
                self.reload_after,
            )
        if self.in_a_row < self.reload_after:
            return False
        if self.reloads >= self.max_reloads:
            raise UserError(
                f"steps {step - self.in_a_row + 1}-{step} had a non-finite loss or gradient norm after "
                f"{self.reloads} reloads of the last checkpoint (train.max_reloads={self.max_reloads}): "
                f"giving up; lower optim.lr, raise optim.warmup_steps or check the data"
            )
        self.reloads += 1
        self.in_a_row = 0
        return True
