"""PyTorch FSDP2: parameters, gradients and optimizer state sharded over all ranks.

The recipe, in order: shard each transformer block (its parameters are gathered just before it
runs and freed after), then the root (embeddings, final norm, head). Mixed precision keeps fp32
master weights and computes in bf16, reducing gradients in fp32.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from pretrain.config import Config
from pretrain.engines.torch_native import TorchEngine


class FSDPEngine(TorchEngine):
    def _wrap(self, model: nn.Module, cfg: Config) -> nn.Module:
        options = {
            "mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if cfg.engine.precision == "bf16" else MixedPrecisionPolicy(),
            "offload_policy": CPUOffloadPolicy() if cfg.engine.offload_params else OffloadPolicy(),
        }
        for block in model.blocks:
            fully_shard(block, reshard_after_forward=cfg.engine.reshard_after_forward, **options)
        fully_shard(model, **options)
        return model

    @contextlib.contextmanager
    def _gradient_sync(self, enabled: bool):
        self.wrapped.set_requires_gradient_sync(enabled)
        yield
