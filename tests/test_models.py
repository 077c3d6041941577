"""The language models: paper parameter counts, the model API, init, and that they learn."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from pretrain.config import ModelConfig
from pretrain.errors import UserError
from pretrain.models import build_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"
TINY = ["tost_tiny", "gpt2_tiny"]


def load(name: str) -> DictConfig:
    """A configs/model/ file merged onto the schema, as Hydra hands it to the trainer."""
    schema = OmegaConf.structured(ModelConfig)
    return OmegaConf.merge(schema, OmegaConf.load(CONFIGS / f"{name}.yaml"))


@pytest.mark.parametrize(
    "name, millions",
    [("tost_base", 110), ("tost_medium", 304), ("tost_large", 655), ("gpt2_base", 124)],
)
def test_param_counts_match_paper(name: str, millions: int) -> None:
    cfg = load(name)
    with torch.device("meta"):
        model = build_model(cfg)
    assert round(model.num_params() / 1e6) == millions
    position_table = cfg.seq_len * cfg.n_embd
    with_positions = model.num_params(exclude_position_embeddings=False)
    assert with_positions == model.num_params() + position_table


def test_flops_per_token() -> None:
    L, D, V, T = 12, 768, 50304, 1024
    with torch.device("meta"):
        gpt2, tost = build_model(load("gpt2_base")), build_model(load("tost_base"))
    # 6 per matmul weight (qkv + out 4D^2 or U + out 2D^2, MLP 8D^2, tied head V*D) + mixing.
    assert gpt2.flops_per_token() == 6 * (L * 12 * D * D + V * D) + 12 * L * D * T
    assert tost.flops_per_token() == 6 * (L * 10 * D * D + V * D) + 36 * L * D


@pytest.mark.parametrize("name", TINY)
def test_forward_shapes_and_initial_loss(name: str) -> None:
    torch.manual_seed(0)
    cfg = load(name)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 32))
    labels = torch.randint(0, cfg.vocab_size, (2, 32))
    assert model(ids).shape == (2, 32, cfg.vocab_size)
    loss = model(ids, labels)
    assert loss.ndim == 0 and loss.dtype == torch.float32
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.3
    labels[:, 16:] = -100
    torch.testing.assert_close(model(ids, labels), model(ids[:, :16], labels[:, :16]))
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, cfg.seq_len + 1, dtype=torch.long))


@pytest.mark.parametrize("name", TINY)
def test_tied_head_and_no_weight_decay(name: str) -> None:
    model = build_model(load(name))
    assert model.lm_head.weight is model.wte.weight
    params = dict(model.named_parameters())
    expected = {"wpe.weight"}
    if name.startswith("tost"):
        expected |= {f"blocks.{i}.attn.{p}" for i in range(len(model.blocks)) for p in ("temp", "denom_bias")}
    assert model.no_weight_decay() == expected
    assert all(params[n].ndim >= 2 for n in expected)


def test_init() -> None:
    torch.manual_seed(0)
    tost, gpt2 = build_model(load("tost_tiny")), build_model(load("gpt2_tiny"))
    residual_std = 0.02 / math.sqrt(2 * len(tost.blocks))
    for block in tost.blocks:
        for proj in (block.attn.out_proj, block.mlp.out_proj):
            assert abs(proj.weight.std().item() - residual_std) < 0.1 * residual_std
        assert abs(block.attn.U.weight.std().item() - 0.02) < 0.002
        assert torch.all(block.attn.temp == 1) and torch.all(block.attn.denom_bias == 0)
        assert torch.all(block.ls_1.gamma == 1e-5) and torch.all(block.ls_2.gamma == 1e-5)
    assert all(torch.all(b.attn.qkv.bias == 0) for b in gpt2.blocks)
    assert not any("gamma" in n for n, _ in gpt2.named_parameters())  # GPT-2: no LayerScale


@pytest.mark.parametrize("name", TINY)
def test_training_reduces_loss(name: str) -> None:
    torch.manual_seed(0)
    cfg = load(name)
    model = build_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, cfg.vocab_size, (4, 33))
    losses = []
    for _ in range(5):
        loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


def test_dropout_only_in_training() -> None:
    cfg = load("tost_tiny")
    cfg.dropout = 0.1
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 16))
    assert not torch.equal(model(ids), model(ids))
    model.eval()
    assert torch.equal(model(ids), model(ids))


def test_config_errors_name_the_field() -> None:
    with pytest.raises(UserError, match=r"model\.name.*'bogus'.*tost.*gpt2"):
        build_model(ModelConfig(name="bogus"))
    with pytest.raises(UserError, match=r"model\.n_embd.*model\.n_head"):
        build_model(ModelConfig(n_embd=100, n_head=3))


@pytest.mark.parametrize("name", ["gpt2", "tost"])
def test_flop_counter_matches_a_hand_count_and_torch_for_two_layers(name: str) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from pretrain.config import ModelConfig

    L, D, V, T, B = 2, 64, 1000, 32, 2
    cfg = ModelConfig(name=name, n_layer=L, n_head=4, n_embd=D, vocab_size=V, seq_len=T, bias=False)
    model = build_model(cfg)
    # By hand, per token, training = forward (2 FLOPs per weight: multiply, add) + backward (4).
    # GPT-2 layer: qkv 3D^2 + out D^2 + MLP 8D^2 weights; attention q.k and a.v: 2 * 2 * T * D.
    # ToST layer: U D^2 + out D^2 + MLP 8D^2 weights; TSSA's elementwise work, 12 per coordinate.
    head = 6 * V * D
    if name == "gpt2":
        per_layer_matmul, per_layer_mixing = 6 * 12 * D * D, 3 * 4 * T * D
    else:
        per_layer_matmul, per_layer_mixing = 6 * 10 * D * D, 3 * 12 * D
    assert model.flops_per_token() == head + L * (per_layer_matmul + per_layer_mixing)

    # torch counts the matmuls (and SDPA) it really runs in forward + backward; TSSA's
    # elementwise term is invisible to it, so it must see exactly the rest.
    ids = torch.randint(0, V, (B, T))
    # The math backend runs attention as plain matmuls, which the counter sees on any device.
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(ids, ids).backward()
    counted_per_token = counter.get_total_flops() / (B * T)
    expected = head + L * per_layer_matmul + (L * per_layer_mixing if name == "gpt2" else 0)
    assert counted_per_token == expected
