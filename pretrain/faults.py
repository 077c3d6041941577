"""Fault injection for the crash and guard tests: die like a lost node at a named point, or
produce a NaN loss at named steps.

With WHITEBOX_CRASH_AT="<point>:<step>" in the environment, the process that reaches `point`
while handling `step` kills its whole process group (launcher, every rank, loader workers) with
SIGKILL, as a node failure would: no handler runs, no file is closed. Unset, as in every real
run, no step is checked (the trainer installs FaultInjection only when a variable is set) and
each point within a save costs one environment lookup.

Points: "step" (after the optimizer update of `step`), and within the save of `step`:
"save.staged" (every rank's files staged, nothing uploaded), "upload.first_file" (one file
uploaded), "upload.recorded" (a node's upload record written), "commit.before_manifest" (all
uploads recorded, manifest not yet written), "commit.after_manifest" (committed).

With WHITEBOX_FAIL_AT="<point>:<step>" (step `*`: any step) the process that reaches a save's
`point` raises OSError there instead, as a full disk or a read-only store would.
With WHITEBOX_NAN_AT="5,6" rank 0's loss is NaN in steps 5 and 6, as a bad batch on one rank
would make it; each listed step is poisoned once (list it twice to poison its replay too).
"""

from __future__ import annotations

import os
import signal
from collections import Counter

from torch import Tensor, nn

from pretrain.callbacks import Callback, LoopState
from pretrain.engines.base import StepResult

ENV = "WHITEBOX_CRASH_AT"
FAIL_ENV = "WHITEBOX_FAIL_AT"
NAN_ENV = "WHITEBOX_NAN_AT"
POINTS = (
    "step",
    "save.staged",
    "upload.first_file",
    "upload.recorded",
    "commit.before_manifest",
    "commit.after_manifest",
)


def crash_point(point: str, step: int) -> None:
    if os.environ.get(ENV) == f"{point}:{step}":
        os.killpg(os.getpgrp(), signal.SIGKILL)
    if os.environ.get(FAIL_ENV) in (f"{point}:{step}", f"{point}:*"):
        raise OSError(f"injected failure at {point} of step {step} ({FAIL_ENV})")


class FaultInjection(Callback):
    """The step-time faults: a crash at point "step", NaN losses in the listed steps (rank 0).
    The trainer installs it only when WHITEBOX_CRASH_AT or WHITEBOX_NAN_AT is set (`from_env`),
    so real runs never carry it."""

    def __init__(self, nan_steps: Counter[int] | None) -> None:
        self.nan_left = nan_steps  # how many more times each step's loss is poisoned
        self.step = 0  # the step running now

    @classmethod
    def from_env(cls, rank: int) -> FaultInjection | None:
        steps = os.environ.get(NAN_ENV)
        nan_steps = Counter(int(s) for s in steps.split(",")) if steps and rank == 0 else None
        return cls(nan_steps) if nan_steps or os.environ.get(ENV) else None

    def on_fit_start(self, loop: LoopState) -> None:
        if self.nan_left is not None:
            loop.engine.model.register_forward_hook(self._poison)

    def _poison(self, module: nn.Module, args: tuple, loss: Tensor) -> Tensor:
        return loss * float("nan") if self.nan_left[self.step] > 0 else loss

    def on_step_start(self, loop: LoopState) -> None:
        self.step = loop.step + 1

    def on_step_end(self, loop: LoopState, result: StepResult) -> None:
        if self.nan_left is not None:
            self.nan_left[self.step] = max(0, self.nan_left[self.step] - 1)
        crash_point("step", loop.step)
