"""What counts as a checkpoint: only committed step directories, and only for the same world."""

from __future__ import annotations

import json

import pytest
import torch

from pretrain.checkpoint.manager import CheckpointManager, step_dir_name
from pretrain.config import load_config
from pretrain.distributed import DistInfo
from pretrain.errors import UserError
from pretrain.trainer import Trainer

ONE_RANK = DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))


def commit(root, step, world_size=1):
    step_dir = root / step_dir_name(step)
    step_dir.mkdir(parents=True)
    (step_dir / "meta.json").write_text(json.dumps({"step": step, "world_size": world_size}))
    return step_dir


def test_latest_is_the_newest_committed_step_and_ignores_interrupted_saves(tmp_path):
    manager = CheckpointManager(str(tmp_path / "checkpoints"), ONE_RANK)
    assert manager.committed_steps() == [] and manager.latest() is None
    commit(tmp_path / "checkpoints", 100)
    commit(tmp_path / "checkpoints", 20)
    (tmp_path / "checkpoints" / step_dir_name(300)).mkdir()  # a save killed before meta.json
    (tmp_path / "checkpoints" / "step_0000040").mkdir()  # not our naming
    (tmp_path / "checkpoints" / "zero_to_fp32.py").write_text("")
    assert manager.committed_steps() == [20, 100]
    assert manager.latest() == str(tmp_path / "checkpoints" / step_dir_name(100))


def test_loading_an_uncommitted_or_foreign_world_checkpoint_is_a_named_error(tmp_path):
    manager = CheckpointManager(str(tmp_path), ONE_RANK)
    half = tmp_path / step_dir_name(5)
    half.mkdir()
    with pytest.raises(UserError, match=f"{half} is not a committed checkpoint"):
        manager.load(str(half), engine=None)
    wider = commit(tmp_path, 6, world_size=8)
    with pytest.raises(UserError, match="written by 8 ranks but this run has 1"):
        manager.load(str(wider), engine=None)


def test_resume_setting(tmp_path):
    def resume_dir(value):
        cfg = load_config(["+exp=tost_gpt2_smoke", f"run_dir={tmp_path}", f"checkpoint.resume={value}"])
        return Trainer(cfg, ONE_RANK)._resume_dir(CheckpointManager(str(tmp_path / "checkpoints"), ONE_RANK))

    assert resume_dir("auto") is None  # nothing saved yet: a fresh start
    step_dir = commit(tmp_path / "checkpoints", 7)
    assert resume_dir("auto") == str(step_dir)
    assert resume_dir("none") is None
    assert resume_dir(str(step_dir)) == str(step_dir)
    with pytest.raises(UserError, match="checkpoint.resume="):
        resume_dir(str(tmp_path / "nowhere"))
