"""What DDP and FSDP2 share: the PyTorch training step, clipping and DCP checkpoints.

Subclasses only say how the model is wrapped and how gradient synchronisation is held back
during accumulation. Checkpoints go through torch.distributed.checkpoint for both, so a DDP
checkpoint and an FSDP one have the same layout, and DCP can reshard either to another world size.
"""

from __future__ import annotations

import contextlib
import math
import os
from abc import abstractmethod

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

from pretrain.batch import Batch
from pretrain.config import Config
from pretrain.distributed import DistInfo
from pretrain.engines.base import Accept, Engine, StepResult
from pretrain.errors import UserError
from pretrain.optim import build_optimizer, build_scheduler

DCP_DIR = "dcp"
SCHEDULER_FILE = "scheduler.pt"


class TorchEngine(Engine):
    def __init__(self, model: nn.Module, cfg: Config, dist_info: DistInfo):
        self.device = dist_info.device
        self.is_main = dist_info.is_main
        self._model = model.to(self.device)
        self.wrapped = self._wrap(self._model, cfg)
        # Fused where every parameter (a shard of it, under FSDP) lives on the GPU, not with FSDP's CPU offload.
        on_gpu = all(p.device.type == "cuda" for p in self._model.parameters())
        self.optimizer = build_optimizer(self._model, cfg.optim, fused=on_gpu)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim)
        self.grad_clip = cfg.optim.grad_clip

    @abstractmethod
    def _wrap(self, model: nn.Module, cfg: Config) -> nn.Module:
        """The module that runs forward: the model itself, DDP around it, or it sharded in place."""

    @abstractmethod
    def _gradient_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """Hold back the cross-rank gradient reduction on all but the last micro-batch."""

    def _autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @property
    def model(self) -> nn.Module:
        return self._model

    def train_step(self, micro_batches: list[Batch], accept: Accept | None = None) -> StepResult:
        lr = self.scheduler.get_last_lr()[0]
        total = torch.zeros((), dtype=torch.float64, device=self.device)  # float64: the sum a Python float made
        for i, batch in enumerate(micro_batches):
            with self._gradient_sync(i == len(micro_batches) - 1), self._autocast():
                loss = self.wrapped(**self.to_device(batch))
                (loss / len(micro_batches)).backward()
            total += loss.detach()
        # The step's one host sync, after every backward and the clipping are queued: the update
        # depends on a host decision (a non-finite norm skips it, `accept` may withhold it), so the
        # GPU's work up to here has to finish first. Loss and norm come back in one transfer.
        loss_sum, grad_norm = torch.stack([total, self._clip_grad_norm().to(total.device, torch.float64)]).tolist()
        loss = loss_sum / len(micro_batches)
        skipped = not math.isfinite(grad_norm)  # global, so every rank decides alike
        withheld = not skipped and accept is not None and not accept(loss)
        if not (skipped or withheld):
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, grad_norm, lr, skipped, withheld)

    def predict(self, batch: Batch) -> torch.Tensor:
        inputs = {k: v for k, v in self.to_device(batch).items() if k != "labels"}
        self.wrapped.eval()
        try:
            with torch.no_grad(), self._autocast():
                return self.wrapped(**inputs)
        finally:
            self.wrapped.train()

    def _clip_grad_norm(self) -> torch.Tensor:
        """Global norm before clipping, left on the device (clipping itself needs no sync); with
        sharded (DTensor) gradients torch reduces the per-shard norms across ranks, and the result
        is itself a DTensor to be gathered."""
        norm = torch.nn.utils.clip_grad_norm_(self._model.parameters(), self.grad_clip)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    def save(self, step_dir: str) -> None:
        model_state, optim_state = get_state_dict(self.wrapped, self.optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=os.path.join(step_dir, DCP_DIR))
        if self.is_main:
            torch.save(self.scheduler.state_dict(), os.path.join(step_dir, SCHEDULER_FILE))

    def load(self, step_dir: str, saved_world_size: int) -> None:
        """DCP reads whatever shards of the saved tensors this rank's shards need, so any
        number of saving ranks works."""
        if not os.path.isdir(os.path.join(step_dir, DCP_DIR)):
            raise UserError(f"checkpoint {step_dir} holds no {DCP_DIR}/ directory; was it written by engine=deepspeed?")
        model_state, optim_state = get_state_dict(self.wrapped, self.optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=os.path.join(step_dir, DCP_DIR))
        set_state_dict(self.wrapped, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.scheduler.load_state_dict(torch.load(os.path.join(step_dir, SCHEDULER_FILE), weights_only=True))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        state = get_model_state_dict(self.wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if dist.get_rank() == 0 else {}
