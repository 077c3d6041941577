"""The one interface the trainer sees: a model with its optimizer, schedule and parallelism."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pretrain.batch import Batch
from pretrain.models.contract import PretrainModel

Accept = Callable[[float], bool]  # collective: whether a step with this loss (this rank's) may update


@dataclass(frozen=True)
class StepResult:
    loss: float  # this rank's mean loss over the step's micro-batches
    grad_norm: float  # global norm before clipping
    lr: float  # the learning rate this step used
    skipped: bool = False  # the gradient norm was not finite: no update, the schedule did not advance
    withheld: bool = False  # `accept` refused the update: none was made, the schedule did not advance

    @property
    def bad(self) -> bool:
        """A non-finite global gradient norm (a NaN or inf loss on any rank makes it so): the
        same verdict on every rank, whether or not the engine could skip the update."""
        return not self.withheld and (self.skipped or not math.isfinite(self.grad_norm))


class Engine(ABC):
    """Wraps a model so that the trainer can step, save and load it without knowing how.

    `train_step` takes every micro-batch of one optimizer step (gradient accumulation is the
    engine's business); `save`/`load` write and read the engine's native files in a step
    directory, on every rank, collectively. A step whose global gradient norm is not finite (a
    NaN or inf loss on any rank makes it so) changes nothing and reports itself skipped, on
    every rank alike, where the engine can skip it (all but DeepSpeed without ZeRO). `load` is
    told how many ranks wrote the files: an engine reshards them onto this run's ranks, or
    refuses with a UserError saying why.
    """

    device: torch.device

    @property
    @abstractmethod
    def model(self) -> PretrainModel:
        """The unwrapped model (possibly holding only this rank's shards)."""

    @abstractmethod
    def train_step(self, micro_batches: list[Batch], accept: Accept | None = None) -> StepResult:
        """One optimizer step over `micro_batches`. `accept`, if given, is called on every rank
        with this rank's mean loss of the step once it is known and before the update; when it
        returns False no update is made, as for a skipped step (`withheld`)."""

    @abstractmethod
    def save(self, step_dir: str) -> None: ...

    @abstractmethod
    def load(self, step_dir: str, saved_world_size: int) -> None: ...

    @abstractmethod
    def predict(self, batch: Batch) -> torch.Tensor:
        """Collective: the model's output for the batch's inputs (its labels left out), in eval
        mode and without gradients."""

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: the complete, unsharded weights on CPU on rank 0 (empty on other ranks)."""

    # This rank's piece of each trainable weight, by name: what an average of the weights
    # (pretrain/ema.py) keeps. Here the engine replicates whole tensors on every rank; engines
    # that shard weights override all four.

    def local_weights(self) -> dict[str, torch.Tensor]:
        """Views of the live storage (the training dtype), so reading them is reading the model."""
        return {name: p.detach() for name, p in self.model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def set_local_weights(self, values: dict[str, torch.Tensor]) -> None:
        """Collective: the model computes with `values` (pieces as `local_weights` gives) from now on."""
        for name, piece in self.local_weights().items():
            piece.copy_(values[name])

    def full_weights(self, pieces: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Collective: whole tensors from every rank's pieces, on CPU on rank 0 (empty elsewhere)."""
        return {name: t.detach().cpu().clone() for name, t in pieces.items()} if dist.get_rank() == 0 else {}

    def local_pieces(self, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's pieces of whole tensors (by name, as `full_weights` gives)."""
        return {name: full[name].to(self.device) for name in self.local_weights()}

    def to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
