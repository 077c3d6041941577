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
            wrapped = model
        else:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = DistributedDataParallel(model, device_ids=device_ids)
        if cfg.engine.compile and cfg.engine.compile_scope == "model":
            # One graph from embedding to loss: the head and cross-entropy fuse too, which blocks
            # alone leave eager. In place (parameter names unchanged), and around DDP, so that
            # dynamo cuts the graph at DDP's gradient buckets and their all-reduces still overlap
            # backward.
            wrapped.compile()
        return wrapped

    def _gradient_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        if enabled or not isinstance(self.wrapped, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.wrapped.no_sync()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.autocast_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
