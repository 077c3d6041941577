"""Engine settings: impossible combinations are refused up front; DeepSpeed's config is ours."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import MAIN, REPO

from pretrain.config import load_config
from pretrain.distributed import free_port
from pretrain.engines import check_engine_config
from pretrain.engines.deepspeed import deepspeed_config
from pretrain.errors import UserError


def cfg(*overrides: str):
    return load_config(["+exp=tost_gpt2_smoke", *overrides])


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["engine.name=megatron"], 1, "engine.name='megatron'"),
        (["engine.precision=fp16"], 1, "engine.precision='fp16'"),
        (["engine.zero_stage=4"], 1, "engine.zero_stage=4"),
        (["engine.zero_stage=2", "engine.offload_params=true"], 1, "engine.offload_params needs engine.zero_stage=3"),
        (
            ["engine.zero_stage=0", "engine.offload_optimizer=true"],
            1,
            "engine.offload_optimizer needs engine.zero_stage >= 1",
        ),
        (
            ["engine.zero_stage=0", "train.spike.action=skip"],
            1,
            "train.spike.action=skip cannot withhold an update under DeepSpeed without ZeRO",
        ),
        (
            ["engine.zero_stage=3", "engine.compile=true"],
            1,
            "engine.compile=true is not supported with engine.zero_stage=3",
        ),
        (["engine.compile_scope=layers"], 1, "engine.compile_scope='layers'"),
        (["engine=fsdp", "engine.compile=true", "engine.compile_scope=model"], 1, "engine.compile_scope=model needs"),
        (["engine.compile=true", "engine.compile_scope=model"], 1, "engine.compile_scope=model needs engine=ddp"),
        (["+engine.deepspeed_overrides.train_batch_size=64"], 1, "engine.deepspeed_overrides.train_batch_size"),
        (["engine=fsdp", "+engine.deepspeed_overrides.bf16.enabled=true"], 1, "only applies to engine=deepspeed"),
        (["engine=fsdp", "engine.offload_optimizer=true"], 1, "set engine.offload_params=true"),
        (["engine=ddp", "engine.offload_params=true"], 1, "engine=ddp cannot offload"),
        (["engine=fsdp", "train.global_batch_size=6", "train.micro_batch_size=4"], 2, "train.global_batch_size=6"),
        (["engine.activation_checkpointing=some"], 1, "engine.activation_checkpointing='some'"),
        (
            ["engine.activation_checkpointing=every_k", "engine.activation_checkpointing_every=0"],
            1,
            "engine.activation_checkpointing_every=0",
        ),
    ],
)
def test_impossible_combinations_are_one_named_error(overrides, world, message):
    with pytest.raises(UserError, match=message.replace("+", r"\+").replace("(", r"\(")):
        check_engine_config(cfg(*overrides), world_size=world)


@pytest.mark.skipif(torch.cuda.is_available(), reason="offload is possible with a GPU")
def test_offload_without_a_gpu_is_refused():
    with pytest.raises(UserError, match="no GPU here"):
        check_engine_config(cfg("engine.zero_stage=3", "engine.offload_params=true"), world_size=1)


@pytest.mark.slow
def test_the_check_runs_before_any_process_group():
    """A rank whose peer never comes would block in init_process_group: it must fail at once."""
    env = {
        **os.environ,
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "PYTHONPATH": str(REPO),
    }
    proc = subprocess.run(
        [
            sys.executable,
            MAIN,
            "+exp=tost_gpt2_smoke",
            "engine=fsdp",
            "train.global_batch_size=6",
            "train.micro_batch_size=4",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "train.global_batch_size=6" in proc.stderr


def test_deepspeed_config_is_generated_from_ours_with_overrides_merged_last():
    generated = deepspeed_config(
        cfg(
            "engine.zero_stage=3",
            "engine.offload_params=true",
            "engine.offload_optimizer=true",
            "train.global_batch_size=32",
            "train.micro_batch_size=4",
            "optim.grad_clip=0.5",
            "+engine.deepspeed_overrides.zero_optimization.overlap_comm=true",
            "+engine.deepspeed_overrides.zero_optimization.stage3_prefetch_bucket_size=1000",
            "+engine.deepspeed_overrides.wall_clock_breakdown=true",
        ),
        world_size=2,
    )
    assert generated["train_micro_batch_size_per_gpu"] == 4 and generated["gradient_accumulation_steps"] == 4
    assert generated["gradient_clipping"] == 0.5 and generated["bf16"] == {"enabled": False}
    assert generated["zero_optimization"] == {
        "stage": 3,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True},
        "overlap_comm": True,
        "stage3_prefetch_bucket_size": 1000,
    }
    assert generated["wall_clock_breakdown"] is True
