"""Engine registry: `engine.name` picks how the model is wrapped, sharded and stepped."""

from __future__ import annotations

from torch import nn

from pretrain.config import Config
from pretrain.distributed import DistInfo
from pretrain.engines.base import Engine, StepResult
from pretrain.errors import UserError

PRECISIONS = ("bf16", "fp32")


def build_engine(model: nn.Module, cfg: Config, dist: DistInfo) -> Engine:
    if cfg.engine.precision not in PRECISIONS:
        raise UserError(f"engine.precision={cfg.engine.precision!r} is not one of {', '.join(PRECISIONS)}")
    if cfg.engine.name == "deepspeed":
        from pretrain.engines.deepspeed import DeepSpeedEngine  # imports DeepSpeed only when used

        return DeepSpeedEngine(model, cfg, dist)
    if cfg.engine.name == "single":
        from pretrain.engines.single import SingleEngine

        return SingleEngine(model, cfg, dist)
    raise UserError(f"engine.name={cfg.engine.name!r} is not an engine; use deepspeed or single")


__all__ = ["Engine", "StepResult", "build_engine"]
