"""An exponential moving average (EMA) of the weights, evaluated beside the trained weights.

The recipe of DeiT and XCiT, whose training code ToST's vision models were trained with, keeps
one, updated after every optimizer step: average <- decay * average + (1 - decay) * weights.

The average is fp32 whatever the training precision (a decay of 0.99996 moves it by 4e-5 of
the difference, below bf16's resolution) and each rank keeps it for its own piece of each
weight only, so it is sharded as the engine shards. A checkpoint holds it whole, by name, in one
file written by rank 0: any number of ranks resumes from it, and it is a plain state dict of the
averaged model's weights (and batch-norm statistics).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

from pretrain.callbacks import Callback, LoopState
from pretrain.checkpoint.manager import Checkpointable
from pretrain.engines.base import Engine, StepResult
from pretrain.errors import UserError

log = logging.getLogger(__name__)

EMA_FILE = "ema.pt"


class WeightAverage(Callback):
    """Updated after every applied step; each evaluation runs a second pass with the average in
    place of the weights, logged as eval_ema_*; checkpoints hold it as ema.pt."""

    def __init__(self, engine: Engine, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise UserError(
                f"train.ema_decay={decay} must be 0 (no average) or between 0 and 1, like the 0.99996 of DeiT's recipe"
            )
        self.engine, self.decay = engine, decay
        self.average = self._copy(self._live())

    def on_step_end(self, loop: LoopState, result: StepResult) -> None:
        if not result.bad:  # a skipped step changed no weight
            self.update()

    def on_eval(self, loop: LoopState, metrics: dict[str, float]) -> None:
        with self.applied():
            averaged = loop.task.evaluate(self.engine)
        metrics |= {f"eval_ema_{k.removeprefix('eval_')}": v for k, v in averaged.items() if k.startswith("eval_")}

    def checkpointables(self) -> list[Checkpointable]:
        return [self]

    def _buffers(self) -> dict[str, torch.Tensor]:
        """Floating buffers (batch-norm statistics), whole on every rank under every engine: they
        belong to the weights that made them, so they are averaged alike."""
        return {name: b for name, b in self.engine.model.named_buffers() if b.is_floating_point()}

    def _live(self) -> dict[str, torch.Tensor]:
        return {**self.engine.local_weights(), **self._buffers()}

    @staticmethod
    def _copy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: t.detach().float().clone() for name, t in tensors.items()}

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step; a skipped step is not one."""
        for name, t in self._live().items():
            self.average[name].lerp_(t.float(), 1.0 - self.decay)

    @torch.no_grad()
    def _set(self, values: dict[str, torch.Tensor]) -> None:
        self.engine.set_local_weights(values)
        for name, b in self._buffers().items():
            b.copy_(values[name])

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Collective: the model computes with the average inside, with its trained weights
        again after."""
        trained = {name: t.clone() for name, t in self._live().items()}
        self._set(self.average)
        try:
            yield
        finally:
            self._set(trained)

    def full(self) -> dict[str, torch.Tensor]:
        """Collective: the whole average, by name, on CPU on rank 0 (empty elsewhere)."""
        full = self.engine.full_weights({name: self.average[name] for name in self.engine.local_weights()})
        if dist.get_rank() != 0:
            return {}
        return {**full, **{name: self.average[name].cpu() for name in self._buffers()}}

    def save(self, step_dir: str) -> None:
        """Collective: the whole average into `step_dir`/ema.pt (rank 0 writes)."""
        full = self.full()
        if dist.get_rank() == 0:
            torch.save(full, os.path.join(step_dir, EMA_FILE))

    def load(self, step_dir: str, saved_world_size: int) -> None:
        """This rank's pieces of the saved average; a checkpoint without one (written with the
        EMA off) starts it from the restored weights."""
        path = os.path.join(step_dir, EMA_FILE)
        if not os.path.isfile(path):
            log.warning(
                "the checkpoint holds no %s (saved with train.ema_decay=0): the weight average starts from its weights",
                EMA_FILE,
            )
            self.average = self._copy(self._live())
            return
        full = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        buffers = {name: full[name].to(b.device) for name, b in self._buffers().items()}
        self.average = self._copy({**self.engine.local_pieces(full), **buffers})
