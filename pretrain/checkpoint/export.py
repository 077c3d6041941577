"""A checkpoint's model weights, whole and in fp32, read in one process without any engine: for
tools (generation, conversion) that need the trained model, not the training state."""

from __future__ import annotations

import contextlib
import glob
import io
import os
import tempfile

import torch

from pretrain.engines.torch_native import DCP_DIR
from pretrain.errors import UserError

DEEPSPEED_MODEL_FILE = "mp_rank_00_model_states.pt"


def model_weights(step_dir: str, engine: str) -> dict[str, torch.Tensor]:
    """The weights in a local, verified step directory written by `engine` (the manifest's):
    DeepSpeed ZeRO's partitions merged by its zero_to_fp32, or FSDP2/DDP's DCP shards joined."""
    if engine == "deepspeed":
        return _deepspeed_weights(step_dir)
    if not os.path.isdir(os.path.join(step_dir, DCP_DIR)):
        raise UserError(f"checkpoint {step_dir} holds no {DCP_DIR}/ directory for engine={engine}")
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "state.pt")
        dcp_to_torch_save(os.path.join(step_dir, DCP_DIR), path)
        return {k: v.float() for k, v in torch.load(path, weights_only=False)["model"].items()}


def _deepspeed_weights(step_dir: str) -> dict[str, torch.Tensor]:
    if glob.glob(os.path.join(step_dir, "*optim_states.pt")):  # ZeRO: fp32 weights live in the partitions
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        root, tag = os.path.split(os.path.normpath(step_dir))
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its progress
            return get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
    path = os.path.join(step_dir, DEEPSPEED_MODEL_FILE)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {step_dir} holds no DeepSpeed model file ({DEEPSPEED_MODEL_FILE})")
    return {k: v.float() for k, v in torch.load(path, weights_only=False)["module"].items()}
