"""Engine registry: `engine.name` picks how the model is wrapped, sharded and stepped."""

from __future__ import annotations

import torch

from pretrain.config import Config, grad_accum_steps
from pretrain.distributed import DistInfo
from pretrain.engines.base import Engine, StepResult
from pretrain.engines.blocks import AC_MODES, COMPILE_SCOPES, prepare_blocks
from pretrain.errors import UserError
from pretrain.models.contract import PretrainModel
from pretrain.optim import OPTIMIZERS

ENGINES = ("deepspeed", "fsdp", "ddp")
PRECISIONS = ("bf16", "fp32")
# Every way of wrapping and sharding a model, by label, as the overrides that choose it: what the
# engine tests and the engine benchmark run, each of them.
VARIANTS = {
    "ddp": ["engine=ddp"],
    "zero0": ["engine=deepspeed", "engine.zero_stage=0"],
    "zero1": ["engine=deepspeed", "engine.zero_stage=1"],
    "zero2": ["engine=deepspeed", "engine.zero_stage=2"],
    "zero3": ["engine=deepspeed", "engine.zero_stage=3"],
    "fsdp": ["engine=fsdp"],
}


def check_engine_config(cfg: Config, world_size: int) -> None:
    """Refuse impossible combinations with one line, before any process group exists."""
    e = cfg.engine

    def fail(message: str) -> None:
        raise UserError(message)

    if e.name not in ENGINES:
        fail(f"engine.name={e.name!r} is not an engine; use one of {', '.join(ENGINES)}")
    if e.precision not in PRECISIONS:
        fail(f"engine.precision={e.precision!r} is not one of {', '.join(PRECISIONS)}")
    if e.activation_checkpointing not in AC_MODES:
        fail(f"engine.activation_checkpointing={e.activation_checkpointing!r} is not one of {', '.join(AC_MODES)}")
    if e.activation_checkpointing == "every_k" and e.activation_checkpointing_every < 1:
        fail(f"engine.activation_checkpointing_every={e.activation_checkpointing_every} must be >= 1")
    if e.compile_scope not in COMPILE_SCOPES:
        fail(f"engine.compile_scope={e.compile_scope!r} is not one of {', '.join(COMPILE_SCOPES)}")
    if e.compile and e.compile_scope == "model" and e.name != "ddp":
        fail(
            f"engine.compile_scope=model needs engine=ddp (engine={e.name} wraps or shards each block, "
            "and compiles blocks): use engine.compile_scope=blocks"
        )
    grad_accum_steps(cfg.train, world_size)  # the global batch must split evenly over the ranks
    if cfg.optim.name not in OPTIMIZERS:
        fail(f"optim.name={cfg.optim.name!r} is not one of {', '.join(OPTIMIZERS)}")
    if e.offload_optimizer and cfg.optim.name != "adamw":
        fail(f"engine.offload_optimizer runs DeepSpeed's CPU Adam: it cannot offload optim.name={cfg.optim.name}")
    if e.name != "deepspeed" and e.deepspeed_overrides:
        fail(f"engine.deepspeed_overrides only applies to engine=deepspeed, not engine={e.name}")
    if e.name == "deepspeed":
        from pretrain.engines.deepspeed import DERIVED_KEYS

        if e.zero_stage not in (0, 1, 2, 3):
            fail(f"engine.zero_stage={e.zero_stage} is not a ZeRO stage; use 0, 1, 2 or 3")
        if e.offload_params and e.zero_stage != 3:
            fail(f"engine.offload_params needs engine.zero_stage=3 (ZeRO-Infinity), not {e.zero_stage}")
        if e.offload_optimizer and e.zero_stage == 0:
            fail("engine.offload_optimizer needs engine.zero_stage >= 1 (ZeRO-Offload)")
        if cfg.train.spike.action == "skip" and e.zero_stage == 0:
            fail(
                "train.spike.action=skip cannot withhold an update under DeepSpeed without ZeRO "
                "(engine.zero_stage=0 has no skipped steps): use train.spike.action=rollback, or engine.zero_stage >= 1"
            )
        if e.compile and e.zero_stage == 3:
            fail(
                "engine.compile=true is not supported with engine.zero_stage=3 (ZeRO-3 hooks every "
                "parameter access); use zero_stage <= 2 or engine=fsdp"
            )
        for key in DERIVED_KEYS:
            if key in e.deepspeed_overrides:
                fail(f"engine.deepspeed_overrides.{key} is generated from train.* and optim.*; set those instead")
    if e.name == "ddp" and (e.offload_params or e.offload_optimizer):
        fail("engine=ddp cannot offload; use engine=fsdp engine.offload_params=true or engine=deepspeed")
    if e.name == "fsdp" and e.offload_optimizer and not e.offload_params:
        fail("engine=fsdp offloads parameters and optimizer together: set engine.offload_params=true")
    if (e.offload_params or e.offload_optimizer) and not torch.cuda.is_available():
        fail(
            "engine.offload_params / engine.offload_optimizer move state from GPU to CPU memory; "
            "there is no GPU here, so turn them off"
        )


def build_engine(model: PretrainModel, cfg: Config, dist: DistInfo) -> Engine:
    check_engine_config(cfg, dist.world_size)
    model = prepare_blocks(model, cfg.engine)
    if cfg.engine.name == "deepspeed":
        from pretrain.engines.deepspeed import DeepSpeedEngine  # imports DeepSpeed only when used

        return DeepSpeedEngine(model, cfg, dist)
    if cfg.engine.name == "fsdp":
        from pretrain.engines.fsdp import FSDPEngine

        return FSDPEngine(model, cfg, dist)
    from pretrain.engines.ddp import DDPEngine

    return DDPEngine(model, cfg, dist)


__all__ = ["VARIANTS", "Engine", "StepResult", "build_engine", "check_engine_config"]
