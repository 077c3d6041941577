"""PyTorch FSDP2: parameters, gradients and optimizer state sharded over all ranks.

The recipe, in order: shard each transformer block (its parameters are gathered just before it
runs and freed after), then the root (embeddings, final norm, head). Mixed precision keeps fp32
master weights and computes in bf16, reducing gradients in fp32.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate

from pretrain.batch import Batch
from pretrain.config import Config
from pretrain.engines.torch_native import TorchEngine


class FSDPEngine(TorchEngine):
    def _wrap(self, model: nn.Module, cfg: Config) -> nn.Module:
        options = {
            "mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if cfg.engine.precision == "bf16"
            else MixedPrecisionPolicy(),
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

    def predict(self, batch: Batch) -> torch.Tensor:
        """A forward without backward leaves the root's weights gathered (FSDP2 frees them in
        backward): shard them again, so that evaluation holds no extra memory after it and the
        weights are DTensor shards for the weight average."""
        try:
            return super().predict(batch)
        finally:
            for module in self.wrapped.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()

    def _sharded(self) -> dict[str, DTensor]:
        """Each trained weight: a DTensor sharded on dim 0 (torch.chunk's split), whose local
        tensor is this rank's piece."""
        return {name: p for name, p in self._model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def local_weights(self) -> dict[str, torch.Tensor]:
        return {name: p.to_local() for name, p in self._sharded().items()}

    def full_weights(self, pieces: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        full = {
            name: DTensor.from_local(pieces[name], p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            .full_tensor()
            .cpu()
            for name, p in self._sharded().items()
        }
        return full if torch.distributed.get_rank() == 0 else {}

    def local_pieces(self, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            name: DTensor.from_local(full[name].to(p.device), p.device_mesh, [Replicate()])
            .redistribute(placements=p.placements)
            .to_local()
            for name, p in self._sharded().items()
        }
