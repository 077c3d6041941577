"""Preemption: a signal asks the run to stop at the next step boundary, with a checkpoint.

Schedulers give notice before they take nodes away: Slurm sends SIGTERM (or, with
`--signal=USR1@120`, SIGUSR1 ahead of time), Kubernetes sends SIGTERM and waits
`terminationGracePeriodSeconds`. The first such signal sets a flag; the training loop sees it
after the current step, saves, waits for the upload to commit, and the process exits with
PREEMPTED_EXIT_CODE, which cluster/ templates treat as "requeue". A second signal exits at once.
"""

from __future__ import annotations

import logging
import os
import signal
from types import FrameType

import torch.distributed as dist

from pretrain.callbacks import Callback, LoopState
from pretrain.distributed import any_rank
from pretrain.engines.base import StepResult
from pretrain.errors import UserError

log = logging.getLogger("pretrain")

# sysexits.h EX_TEMPFAIL, "a temporary failure; the user is invited to retry": exactly this.
PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):
    """Raised out of the training loop once the preemption checkpoint is committed."""


def _signals(names: list[str]) -> list[signal.Signals]:
    found = []
    for name in names:
        sig = getattr(signal, str(name), None)
        if not isinstance(sig, signal.Signals) or sig in (signal.SIGKILL, signal.SIGSTOP):
            raise UserError(
                f"checkpoint.preempt_signals: {name!r} is not a signal that can be caught; "
                "use names like SIGTERM, SIGUSR1"
            )
        found.append(sig)
    return found


class IgnoreSignals:
    """A DataLoader `worker_init_fn`: loader workers leave preemption to the training process.

    Slurm signals every process of a job, loader workers included, and torch's workers die on
    SIGTERM, which would crash the step the notice is meant to finish. Picklable, for spawned
    workers too.
    """

    def __init__(self, signal_names: list[str]) -> None:
        self.signal_names = list(signal_names)

    def __call__(self, worker_id: int) -> None:
        for sig in _signals(self.signal_names):
            signal.signal(sig, signal.SIG_IGN)


class PreemptionWatch:
    """Installs handlers for `signal_names` (e.g. ["SIGTERM", "SIGUSR1"]) in this process."""

    def __init__(self, signal_names: list[str]) -> None:
        self.signal_name: str | None = None  # the first signal received, once one is
        self.worker_init = IgnoreSignals(signal_names)
        self._previous = {sig: signal.signal(sig, self._handle) for sig in _signals(signal_names)}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is not None:
            os._exit(128 + signum)  # the second signal: no more grace
        self.signal_name = signal.Signals(signum).name

    def close(self) -> None:
        """Put the handlers that were there before back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Preemption(Callback):
    """Turns a notice that reached any rank into a stop after the same step on every rank: the
    loop saves, waits for the commit, and the run leaves with Preempted."""

    def __init__(self, watch: PreemptionWatch) -> None:
        self.watch = watch

    def on_step_end(self, loop: LoopState, result: StepResult) -> None:
        loop.stop_requested = any_rank(self.watch.signal_name is not None)

    def on_fit_end(self, loop: LoopState) -> None:
        if not loop.stop_requested:
            return
        dist.barrier()  # no rank exits (and no launcher kills the rest) before rank 0 has committed
        if loop.dist.is_main:
            log.warning(
                "preempted (%s) after step %d: checkpoint %s; exiting with %d so that the scheduler requeues the run",
                self.watch.signal_name or "signal on another rank",
                loop.step,
                loop.checkpoints.store.step_url(loop.step),
                PREEMPTED_EXIT_CODE,
            )
        raise Preempted(loop.step)
