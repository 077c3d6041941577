"""Plain PyTorch: one process as is, several with DistributedDataParallel (full replicas)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pretrain.config import Config
from pretrain.engines.torch_native import TorchEngine


class DDPEngine(TorchEngine):
    def _wrap(self, model: nn.Module, cfg: Config) -> nn.Module:
        self.autocast_bf16 = cfg.engine.precision == "bf16"
        if torch.distributed.get_world_size() == 1:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def _gradient_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        if enabled or not isinstance(self.wrapped, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.wrapped.no_sync()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.autocast_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
