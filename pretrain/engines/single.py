"""One process, no wrapper: the reference every distributed engine must agree with."""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from pretrain.config import Config
from pretrain.distributed import DistInfo
from pretrain.engines.base import Batch, Engine, StepResult
from pretrain.errors import UserError
from pretrain.optim import build_optimizer, build_scheduler

STATE_FILE = "engine.pt"


class SingleEngine(Engine):
    def __init__(self, model: nn.Module, cfg: Config, dist: DistInfo):
        if dist.world_size != 1:
            raise UserError(f"engine.name=single runs one process but the launcher started "
                            f"{dist.world_size}; use engine=deepspeed for several")
        self.device = dist.device
        self._model = model.to(self.device)
        self.optimizer = build_optimizer(self._model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim)
        self.grad_clip = cfg.optim.grad_clip
        self.autocast_bf16 = cfg.engine.precision == "bf16"

    @property
    def model(self) -> nn.Module:
        return self._model

    def _autocast(self):
        if not self.autocast_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def train_step(self, micro_batches: list[Batch]) -> StepResult:
        lr = self.scheduler.get_last_lr()[0]
        total = 0.0
        for batch in micro_batches:
            with self._autocast():
                loss = self._model(**self.to_device(batch))
            (loss / len(micro_batches)).backward()
            total += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(self._model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return StepResult(total / len(micro_batches), grad_norm.item(), lr)

    def save(self, step_dir: str) -> None:
        torch.save({"model": self._model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict()}, os.path.join(step_dir, STATE_FILE))

    def load(self, step_dir: str) -> None:
        state = torch.load(os.path.join(step_dir, STATE_FILE), map_location=self.device, weights_only=True)
        self._model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
