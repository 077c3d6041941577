"""Every model keeps the contract engines, trainer, optimizer and probe rely on
(pretrain/models/contract.py), and a model that breaks it is refused when it is built."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from pretrain.config import ModelConfig
from pretrain.models import MODELS, build_model
from pretrain.models.contract import (
    PretrainModel,
    SparseCodingBlock,
    TokenStatisticsAttention,
    check_model,
    is_whitebox,
)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "model").glob("*.yaml"))
# Which blocks the white-box probe measures, per registered model: all of CRATE's and ToST's.
WHITEBOX = {"tost": True, "crate": True, "tost_vision": True, "gpt2": False, "vit": False}


def build(path: Path) -> nn.Module:
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path))
    with torch.device("meta"):
        return build_model(cfg)


def test_every_registered_model_has_a_config_and_a_whitebox_expectation():
    names = {OmegaConf.load(path).name for path in CONFIGS}
    assert names == set(MODELS) == set(WHITEBOX)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_model_keeps_the_contract(path):
    model = build(path)
    assert isinstance(model, PretrainModel) and isinstance(model.blocks, nn.ModuleList) and len(model.blocks) > 0
    assert model.flops_per_token() > 6 * sum(p.numel() for p in model.blocks.parameters()) > 0
    assert 0 < model.num_params() <= sum(p.numel() for p in model.parameters())
    for name in model.no_weight_decay():
        assert model.get_parameter(name).ndim >= 2, name  # 1-D ones are never decayed anyway
    expected = WHITEBOX[OmegaConf.load(path).name]
    assert [is_whitebox(b) for b in model.blocks] == [expected] * len(model.blocks)
    if expected:
        sparse = OmegaConf.load(path).name == "crate"
        assert all(isinstance(b, SparseCodingBlock) == sparse for b in model.blocks)
        assert all(isinstance(b.attn, TokenStatisticsAttention) != sparse for b in model.blocks)


def test_a_model_that_breaks_the_contract_is_refused():
    crate = build_model(ModelConfig(name="crate", n_layer=1, n_head=2, n_embd=16, image_size=8, patch_size=4))
    check_model(crate)
    with pytest.raises(TypeError, match="Linear is not a PretrainModel.*lacks blocks, flops_per_token, num_params"):
        check_model(nn.Linear(2, 2))
    del crate.blocks[0].ln_2
    with pytest.raises(TypeError, match=r"CRATE.blocks\[0\] has a subspace attention but not the ln_1 and ln_2"):
        check_model(crate)
    del crate.blocks  # a registered child: only a plain attribute can take its place
    crate.blocks = [nn.Identity()]
    with pytest.raises(TypeError, match="CRATE.blocks is a list, not the nn.ModuleList"):
        check_model(crate)
