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
uploads recorded, manifest not yet written), "commit.after_manifest" (committed), "retention"
(committed, old steps not yet deleted).

With WHITEBOX_FAIL_AT="<point>:<step>[,...]" (step `*`: any step) the process that reaches a
save's `point` raises OSError there instead, as a full disk or a read-only store would.
With WHITEBOX_NAN_AT="5,6" rank 0's loss is NaN in steps 5 and 6, as a bad batch on one rank
would make it; each listed step is poisoned once (list it twice to poison its replay too).
With WHITEBOX_SPIKE_AT="30:12,13" rank 0's loss is 30 times what it is in steps 12 and 13 (a loss
spike; the same rule for replays).
With WHITEBOX_KILL_RANK="1:5" rank 1 kills itself with SIGKILL in step 5's forward pass, while
its peers go on into the step's collectives (a lost rank); "1:5:SIGSTOP" freezes it instead (a
hung rank, whose connections stay open).
"""

from __future__ import annotations

import logging
import os
import signal
from collections import defaultdict

from torch import Tensor, nn

from pretrain.callbacks import Callback, LoopState
from pretrain.engines.base import StepResult

log = logging.getLogger("pretrain")

ENV = "WHITEBOX_CRASH_AT"
FAIL_ENV = "WHITEBOX_FAIL_AT"
NAN_ENV = "WHITEBOX_NAN_AT"
SPIKE_ENV = "WHITEBOX_SPIKE_AT"
KILL_ENV = "WHITEBOX_KILL_RANK"
POINTS = (
    "step",
    "save.staged",
    "upload.first_file",
    "upload.recorded",
    "commit.before_manifest",
    "commit.after_manifest",
    "retention",
)


def crash_point(point: str, step: int) -> None:
    if os.environ.get(ENV) == f"{point}:{step}":
        os.killpg(os.getpgrp(), signal.SIGKILL)
    if {f"{point}:{step}", f"{point}:*"} & set(os.environ.get(FAIL_ENV, "").split(",")):
        raise OSError(f"injected failure at {point} of step {step} ({FAIL_ENV})")


class FaultInjection(Callback):
    """The step-time faults: a crash at point "step", rank 0's loss scaled (NaN, a spike) in the
    listed steps, a rank that kills itself in a step's forward pass. The trainer installs it only
    when one of their variables is set (`from_env`), so real runs never carry it."""

    def __init__(self, scales: dict[int, list[float]], kill_step: int | None, kill_signal: str = "SIGKILL") -> None:
        self.scales = scales  # step -> factors for rank 0's loss, one per time the step is taken
        self.kill_step, self.kill_signal = (
            kill_step,
            kill_signal,
        )  # this rank's forward pass in this step signals itself
        self.step = 0  # the step running now

    @classmethod
    def from_env(cls, rank: int) -> FaultInjection | None:
        scales: dict[int, list[float]] = defaultdict(list)
        if rank == 0:
            for step in filter(None, os.environ.get(NAN_ENV, "").split(",")):
                scales[int(step)].append(float("nan"))
            if spikes := os.environ.get(SPIKE_ENV):
                factor, steps = spikes.split(":")
                for step in steps.split(","):
                    scales[int(step)].append(float(factor))
        victim, _, kill_at = os.environ.get(KILL_ENV, "").partition(":")
        kill_step, _, kill_signal = kill_at.partition(":")
        kill_step = int(kill_step) if victim and int(victim) == rank else None
        return cls(scales, kill_step, kill_signal or "SIGKILL") if scales or kill_step or os.environ.get(ENV) else None

    def on_fit_start(self, loop: LoopState) -> None:
        if self.scales or self.kill_step:
            loop.engine.model.register_forward_hook(self._fault)

    def _fault(self, module: nn.Module, args: tuple, loss: Tensor) -> Tensor:
        if self.step == self.kill_step:
            log.warning(
                "fault injection: this rank sends itself %s in step %d's forward pass", self.kill_signal, self.step
            )
            os.kill(os.getpid(), signal.Signals[self.kill_signal])
        return loss * self.scales[self.step][0] if self.scales.get(self.step) else loss

    def on_step_start(self, loop: LoopState) -> None:
        self.step = loop.step + 1

    def on_step_end(self, loop: LoopState, result: StepResult) -> None:
        if self.scales.get(self.step):
            self.scales[self.step].pop(0)
        crash_point("step", loop.step)
