"""What a run does about loss spikes: steps whose loss is far above the recent ones, though finite.

The reference is robust, so that the spikes themselves do not move it: the median and the median
absolute deviation (MAD) of the last `window` step losses that were not outliers. A step is an
outlier when its loss (mean over ranks) exceeds median + threshold x 1.4826 x MAD (1.4826 x MAD
estimates the standard deviation of normal noise) and median x (1 + min_rise). `patience`
outliers in a row are a spike, counted in the `spikes` metric, and then, as configured:
- skip: the engine withholds the update of this step and of every further outlier of the streak
  (no update, no schedule step, as for a non-finite step);
- rollback: the newest committed checkpoint is reloaded and the data go on, so the batches that
  made the spike are not met again; the reloads count against `train.max_reloads`.
Non-finite losses are the non-finite guard's (guard.py), not this detector's.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
from collections import deque

from pretrain.callbacks import Callback, LoopState
from pretrain.config import SpikeConfig
from pretrain.distributed import mean_over_ranks
from pretrain.engines.base import StepResult
from pretrain.errors import UserError

log = logging.getLogger("pretrain")
ACTIONS = ("none", "skip", "rollback")
MAD_TO_SIGMA = 1.4826  # for normal noise, sigma = 1.4826 x MAD
STATE_FILE = "spike_detector.json"


class SpikeDetector(Callback):
    def __init__(self, cfg: SpikeConfig, max_reloads: int, is_main: bool) -> None:
        if cfg.action not in ACTIONS:
            raise UserError(f"train.spike.action={cfg.action!r} is not one of {', '.join(ACTIONS)}")
        self.cfg, self.max_reloads, self.is_main = cfg, max_reloads, is_main
        self.losses: deque[float] = deque(maxlen=cfg.window)  # the reference: recent steps not judged outliers
        self.in_a_row = 0
        self.spikes = 0  # since this process started
        self.rollbacks = 0
        self.rollback_due = False
        self.step = 0  # the step being judged

    def on_step_start(self, loop: LoopState) -> None:
        self.step = loop.step + 1

    def accept_update(self, loop: LoopState, loss: float) -> bool:
        spike = self._judge(mean_over_ranks(loss))
        self.rollback_due = spike and self.cfg.action == "rollback"
        return not (spike and self.cfg.action == "skip")

    def on_step_end(self, loop: LoopState, result: StepResult) -> None:
        if not self.rollback_due:
            return
        if self.rollbacks >= self.max_reloads:
            raise UserError(
                f"a loss spike at step {loop.step} after {self.rollbacks} rollbacks to the last checkpoint "
                f"(train.max_reloads={self.max_reloads}): giving up; lower optim.lr, raise optim.warmup_steps, "
                f"check the data, or use train.spike.action=skip"
            )
        self.rollbacks += 1
        self.in_a_row = 0
        loop.reload_requested = f"a loss spike at step {loop.step}"

    def _judge(self, loss: float) -> bool:
        """Record `loss`; True when it completes a spike (the same verdict on every rank)."""
        if not math.isfinite(loss):
            return False
        if len(self.losses) < self.cfg.min_history:
            self.losses.append(loss)
            return False
        median = statistics.median(self.losses)
        mad = statistics.median(abs(x - median) for x in self.losses)
        limit = max(median + self.cfg.threshold * MAD_TO_SIGMA * mad, median * (1 + self.cfg.min_rise))
        if loss <= limit:
            self.losses.append(loss)
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        spike = self.in_a_row >= self.cfg.patience
        if spike:
            self.spikes += 1
        if self.is_main:
            log.warning(
                "step %d: loss %.4f above the spike limit %.4f (median %.4f of the last %d steps; %d in a row)%s",
                self.step,
                loss,
                limit,
                median,
                len(self.losses),
                self.in_a_row,
                {"skip": "; update skipped", "rollback": "; rolling back"}[self.cfg.action] if spike else "",
            )
        return spike

    def interval_metrics(self) -> dict[str, float]:
        return {"spikes": self.spikes}

    def checkpointables(self) -> list[SpikeDetector]:
        return [self]

    # Checkpointable: the reference travels with checkpoints, so that a resumed run judges the
    # steps after it as the uninterrupted one would.

    def save(self, step_dir: str) -> None:
        if self.is_main:
            with open(os.path.join(step_dir, STATE_FILE), "w") as f:
                json.dump({"losses": list(self.losses), "in_a_row": self.in_a_row}, f)

    def load(self, step_dir: str, saved_world_size: int) -> None:
        path = os.path.join(step_dir, STATE_FILE)
        if os.path.exists(path):  # absent in checkpoints of runs without the detector
            with open(path) as f:
                state = json.load(f)
            self.losses = deque(state["losses"], maxlen=self.cfg.window)
            self.in_a_row = state["in_a_row"]
