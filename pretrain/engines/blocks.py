"""Per-block transforms every engine applies the same way: activation checkpointing and compile.

Both act in place on `model.blocks[i]`, before an engine wraps or shards the model, so parameter
names (and with them weight-decay groups and checkpoint keys) are the same with and without them.
"""

from __future__ import annotations

from torch import nn
from torch.utils.checkpoint import checkpoint

from pretrain.config import EngineConfig
from pretrain.models.contract import PretrainModel

AC_MODES = ("none", "full", "every_k")
COMPILE_SCOPES = ("blocks", "model")  # "model": the engine compiles the whole model (engine=ddp only)


def checkpointed_blocks(n_blocks: int, cfg: EngineConfig) -> list[int]:
    """Indices of the blocks whose activations are recomputed in backward instead of stored."""
    if cfg.activation_checkpointing == "full":
        return list(range(n_blocks))
    if cfg.activation_checkpointing == "every_k":
        return list(range(0, n_blocks, cfg.activation_checkpointing_every))
    return []


def _recompute_in_backward(block: nn.Module) -> None:
    forward = block.forward

    def checkpointed_forward(*args, **kwargs):
        # Non-reentrant: works with FSDP2's and ZeRO-3's parameter hooks and with torch.compile.
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = checkpointed_forward


def prepare_blocks(model: PretrainModel, cfg: EngineConfig) -> PretrainModel:
    """Apply activation checkpointing, then compilation (engine.compile_scope=blocks), to each of `model.blocks`."""
    for i in checkpointed_blocks(len(model.blocks), cfg):
        _recompute_in_backward(model.blocks[i])
    if cfg.compile and cfg.compile_scope == "blocks":
        for block in model.blocks:
            block.compile()
    return model
