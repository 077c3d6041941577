"""Fault injection for the crash and guard tests: die like a lost node at a named point, or
produce a NaN loss at named steps.

With WHITEBOX_CRASH_AT="<point>:<step>" in the environment, the process that reaches `point`
while handling `step` kills its whole process group (launcher, every rank, loader workers) with
SIGKILL, as a node failure would: no handler runs, no file is closed. Unset, as in every real
run, each point costs one environment lookup.

Points: "step" (after the optimizer update of `step`), and within the save of `step`:
"save.staged" (every rank's files staged, nothing uploaded), "upload.first_file" (one file
uploaded), "upload.recorded" (a node's upload record written), "commit.before_manifest" (all
uploads recorded, manifest not yet written), "commit.after_manifest" (committed).

With WHITEBOX_NAN_AT="5,6" rank 0's loss is NaN in steps 5 and 6, as a bad batch on one rank
would make it; each listed step is poisoned once (list it twice to poison its replay too).
"""

from __future__ import annotations

import os
import signal
from collections import Counter

from torch import nn

ENV = "WHITEBOX_CRASH_AT"
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


class NaNLoss:
    """A forward hook that turns the model's loss into NaN in the steps WHITEBOX_NAN_AT lists;
    the trainer says which step is running (`step`)."""

    def __init__(self, model: nn.Module, steps: str) -> None:
        self.left = Counter(int(s) for s in steps.split(","))
        self.step = 0
        model.register_forward_hook(self._poison)

    def _poison(self, module: nn.Module, args: tuple, loss):
        return loss * float("nan") if self.left[self.step] > 0 else loss

    def step_done(self) -> None:
        self.left[self.step] = max(0, self.left[self.step] - 1)


def nan_loss(model: nn.Module, rank: int) -> NaNLoss | None:
    steps = os.environ.get(NAN_ENV)
    return NaNLoss(model, steps) if steps and rank == 0 else None
