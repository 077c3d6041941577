"""Weight-decay groups and the learning-rate schedule."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pretrain.config import ModelConfig, OptimConfig
from pretrain.models import build_model
from pretrain.optim import build_optimizer, build_scheduler, lr_at


def test_decay_only_on_matrices_and_never_on_tssa_statistics_or_positions():
    model = build_model(
        ModelConfig(name="tost", n_layer=2, n_head=4, n_embd=32, vocab_size=128, seq_len=16, layerscale_init=1e-5)
    )
    decay, no_decay = build_optimizer(model, OptimConfig(weight_decay=0.1)).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert decayed | exempt == set(names.values()) and not decayed & exempt
    assert "wte.weight" in decayed
    for name in exempt:
        assert (
            name == "wpe.weight"
            or name.endswith((".temp", ".denom_bias", ".bias"))
            or model.get_parameter(name).ndim == 1
        ), name
    assert "wpe.weight" in exempt
    assert any(n.endswith(".temp") for n in exempt) and any(n.endswith(".denom_bias") for n in exempt)
    assert all(model.get_parameter(n).ndim == 2 for n in decayed)


def test_warmup_then_cosine_to_min_lr():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, decay_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.1 + 0.5 * 0.9 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, cfg) == pytest.approx(0.1) and lr_at(10_000, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_scheduler_drives_the_optimizer_lr():
    model = build_model(ModelConfig(name="gpt2", n_layer=1, n_head=2, n_embd=16, vocab_size=64, seq_len=8, bias=True))
    cfg = OptimConfig(lr=2e-3, min_lr=2e-4, warmup_steps=4, decay_steps=20)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    seen = []
    for _ in range(25):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([lr_at(s, cfg) for s in range(25)])


def test_lion_moves_each_coordinate_by_lr_in_the_sign_of_its_interpolated_momentum():
    """p = (1, 1), g = (0.5, -2), m = 0, lr 0.1, wd 0.5, betas (0.9, 0.99): p -> p (1 - 0.05) -
    0.1 sign(0.1 g) = (0.85, 1.05); m -> 0.01 g. Second step with g = (-0.01, 0): 0.9 m + 0.1 g =
    (0.0035, -0.018), so the first coordinate still moves down although its gradient turned."""
    from pretrain.optim import Lion

    p = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    lion = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    p.grad = torch.tensor([0.5, -2.0])
    lion.step()
    assert torch.allclose(p.detach(), torch.tensor([0.85, 1.05]))
    assert torch.allclose(lion.state[p]["exp_avg"], torch.tensor([0.005, -0.02]))
    p.grad = torch.tensor([-0.01, 0.0])
    lion.step()
    assert torch.allclose(p.detach(), torch.tensor([0.85 * 0.95 - 0.1, 1.05 * 0.95 + 0.1]))
