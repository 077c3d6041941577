"""CRATE, ToST and ViT for images: the formulas of docs/models.md on hand-checkable inputs, the papers'
parameter counts, and one training step of each under DeepSpeed ZeRO-2 and FSDP2 on 2 ranks."""

from __future__ import annotations

import math
from dataclasses import asdict

import pytest
import torch
from torch import nn

from pretrain.config import ModelConfig, load_config
from pretrain.engines import build_engine
from pretrain.errors import UserError
from pretrain.launch import run_local_world
from pretrain.models import build_model
from pretrain.models.crate import ISTA, MSSA, CRATEBlock, patchify
from pretrain.models.tost_vision import ClassAttentionBlock, FourierPositions
from pretrain.trainer import seed_everything

# The papers' tables (docs/models.md), in millions, as text: checked to the digits they give.
PAPER_PARAMS = {
    "crate_tiny": "6.09",
    "crate_small": "13.12",
    "crate_base": "22.80",
    "crate_large": "77.64",
    "vit_tiny": "5.72",
    "vit_small": "22.05",
    "vit_base": "86.6",
    "vit_large": "304",
    "tost_vision_tiny": "5.8",
    "tost_vision_small": "22.6",
}  # ToST-M has no count in the paper


@pytest.mark.parametrize("name", list(PAPER_PARAMS))
def test_parameter_counts_match_the_papers(name):
    expected = float(PAPER_PARAMS[name])
    digits = len(PAPER_PARAMS[name].partition(".")[2])
    with torch.device("meta"):  # shapes only: no memory, no init
        model = build_model(load_config([f"model={name}"]).model)
    assert round(model.num_params() / 1e6, digits) == expected


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(
        **{
            "name": "crate",
            "n_layer": 2,
            "n_head": 1,
            "n_embd": 2,
            "image_size": 8,
            "patch_size": 4,
            "num_classes": 3,
            **overrides,
        }
    )


def identity_(linear: nn.Linear) -> None:
    with torch.no_grad():
        linear.weight.copy_(torch.eye(linear.weight.shape[0]))
        if linear.bias is not None:
            linear.bias.zero_()


def test_mssa_attends_with_the_same_projection_as_query_key_and_value():
    """One head, U = I: tokens e1 and e2 give softmax([1, 0] / sqrt 2) mixes of themselves."""
    mssa = MSSA(tiny(), causal=False, n_tokens=2)
    identity_(mssa.U)
    identity_(mssa.out_proj)
    a = 1 / (1 + math.exp(-1 / math.sqrt(2)))  # weight of a token on itself: 0.669761
    out = mssa(torch.eye(2).unsqueeze(0))
    assert torch.allclose(out[0], torch.tensor([[a, 1 - a], [1 - a, a]]), atol=1e-6)
    causal = MSSA(tiny(), causal=True, n_tokens=2)
    identity_(causal.U)
    identity_(causal.out_proj)
    assert torch.allclose(causal(torch.eye(2).unsqueeze(0))[0], torch.tensor([[1.0, 0.0], [1 - a, a]]), atol=1e-6)


def test_ista_takes_one_step_with_d_and_its_transpose_then_thresholds():
    """D = [[0, 1], [0, 0]], x = (1, 2): D x = (2, 0), x - D x = (-1, 2), D^T (x - D x) = (0, -1);
    ReLU(x + 0.1 * (0, -1) - 0.1 * 0.1) = (0.99, 1.89). Swapping D and D^T would give (1.09, 1.99)."""
    ista = ISTA(tiny())
    with torch.no_grad():
        ista.D.copy_(torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
    assert torch.allclose(ista(torch.tensor([[1.0, 2.0]])), torch.tensor([[0.99, 1.89]]), atol=1e-6)
    assert torch.equal(ista(torch.tensor([[-1.0, 0.005]])), torch.zeros(1, 2))  # below the threshold: sparse


def test_a_crate_layer_has_no_residual_after_ista():
    """Its output is ISTA's ReLU, so non-negative, whatever comes in; with a residual it would not be."""
    block = CRATEBlock(tiny(n_embd=16, n_head=4), causal=False, n_tokens=5)
    out = block(torch.randn(3, 5, 16) * 10)
    assert (out >= 0).all() and (out == 0).any()


def test_patches_are_flattened_channel_last_in_row_major_order():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    patches = patchify(images, 2)  # (2, 4, 12)
    assert patches.shape == (2, 4, 12)
    # Patch 1 is the top-right one (rows 0-1, cols 2-3); its first pixel (0, 2) gives channels 0, 1, 2.
    assert patches[0, 1, :3].tolist() == [images[0, c, 0, 2].item() for c in range(3)]
    assert patches[0, 1, 3:6].tolist() == [images[0, c, 0, 3].item() for c in range(3)]
    assert patches[1, 2, 6:9].tolist() == [images[1, c, 3, 0].item() for c in range(3)]


SMOKE_MODELS = {
    "crate": ["model=crate_smoke"],
    "vit": ["model=vit_smoke"],
    "tost-xcit": ["model=tost_vision_smoke"],
    "tost-vit": ["model=tost_vision_smoke", "model.skeleton=vit"],
}


@pytest.mark.parametrize("name", list(SMOKE_MODELS))
def test_forward_shapes_and_loss(name):
    cfg = load_config(SMOKE_MODELS[name]).model
    model = build_model(cfg)
    images = torch.randn(5, 3, cfg.image_size, cfg.image_size)
    assert model(images).shape == (5, cfg.num_classes)
    loss = model(images, torch.arange(5))
    assert loss.shape == () and abs(loss.item() - math.log(cfg.num_classes)) < 0.5  # near chance at init
    patches = (cfg.image_size // cfg.patch_size) ** 2
    class_token_in_blocks = name != "tost-xcit"  # XCiT's skeleton adds it after the TSSA blocks
    assert model.embed(images).shape == (5, patches + class_token_in_blocks, cfg.n_embd)


def test_an_unknown_skeleton_is_refused_naming_the_key():
    with pytest.raises(UserError, match="model.skeleton='swin' is not one of xcit, vit"):
        build_model(load_config(["model=tost_vision_smoke", "model.skeleton=swin"]).model)


def test_class_attention_updates_the_class_token_only():
    cfg = load_config(["model=tost_vision_smoke"]).model
    x = torch.randn(2, 17, cfg.n_embd)
    out = ClassAttentionBlock(cfg)(x)
    assert torch.equal(out[:, 1:], x[:, 1:]) and not torch.allclose(out[:, 0], x[:, 0])


def test_fourier_positions_tell_every_patch_apart():
    cfg = load_config(["model=tost_vision_smoke"]).model
    positions = FourierPositions(cfg)(4, 4, torch.device("cpu"))  # (16, D)
    assert positions.shape == (16, cfg.n_embd)
    assert torch.cdist(positions, positions).add(torch.eye(16) * 1e9).min() > 1e-4


def train_two_steps(dist_info, name, engine):
    """Two steps on fixed image batches; returns (losses, whether every parameter moved)."""
    cfg = load_config(
        [
            *SMOKE_MODELS[name],
            *engine,
            "engine.precision=fp32",
            "train.global_batch_size=8",
            "train.micro_batch_size=2",
            "optim.lr=1e-3",
            "optim.warmup_steps=1",
        ]
    )
    seed_everything(0)
    model = build_model(cfg.model)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    eng = build_engine(model, cfg, dist_info)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(2):
        images = torch.randn(8, 3, cfg.model.image_size, cfg.model.image_size, generator=g)
        labels = torch.randint(0, cfg.model.num_classes, (8,), generator=g)
        mine = slice(4 * dist_info.rank, 4 * dist_info.rank + 4)
        micro = [{"images": images[mine][i : i + 2], "labels": labels[mine][i : i + 2]} for i in (0, 2)]
        result = eng.train_step(micro)
        losses.append(result.loss)
        assert math.isfinite(result.grad_norm) and not result.skipped
    after = eng.full_state_dict()
    moved = all(not torch.equal(before[k], after[k]) for k in before) if dist_info.rank == 0 else None
    return losses, moved


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SMOKE_MODELS))
@pytest.mark.parametrize(
    "engine", [["engine=deepspeed", "engine.zero_stage=2"], ["engine=fsdp"]], ids=["zero2", "fsdp"]
)
def test_every_vision_model_trains_under_zero2_and_fsdp_on_two_ranks(name, engine):
    (losses, moved), _ = run_local_world(train_two_steps, 2, name, engine)
    assert all(map(math.isfinite, losses)) and moved


def average_two_steps(dist_info):
    """ToST on XCiT's skeleton (batch norm in its patch stem) under FSDP2, with a weight average
    of decay 0.5: the floating buffers after each step, and the whole average after two."""
    from pretrain.ema import WeightAverage

    cfg = load_config(
        [
            *SMOKE_MODELS["tost-xcit"],
            "engine=fsdp",
            "engine.precision=fp32",
            "train.global_batch_size=4",
            "train.micro_batch_size=4",
            "optim.lr=1e-3",
            "optim.warmup_steps=1",
        ]
    )
    seed_everything(0)
    eng = build_engine(build_model(cfg.model), cfg, dist_info)
    ema = WeightAverage(eng, 0.5)

    def buffers():
        return {k: b.detach().clone() for k, b in eng.model.named_buffers() if b.is_floating_point()}

    history, g = [buffers()], torch.Generator().manual_seed(1)
    for _ in range(2):
        images = torch.randn(4, 3, cfg.model.image_size, cfg.model.image_size, generator=g)
        eng.train_step([{"images": images, "labels": torch.randint(0, cfg.model.num_classes, (4,), generator=g)}])
        ema.update()
        history.append(buffers())
    return history, ema.full()


@pytest.mark.slow
def test_the_weight_average_averages_batch_norm_statistics_with_the_weights():
    """The statistics belong to the weights that made them: an average of the weights paired with
    the live statistics evaluated 0.22 top-1 where the weights gave 0.61 (tost_vision_small_smoke)."""
    ((history, average),) = run_local_world(average_two_steps, 1)
    assert any("running_mean" in k for k in history[0]) and set(history[0]) <= set(average)
    for name in history[0]:
        expected = 0.25 * history[0][name] + 0.25 * history[1][name] + 0.5 * history[2][name]
        assert torch.allclose(average[name], expected, atol=1e-6), name
        assert not torch.equal(history[0][name], history[2][name]), name  # the statistics moved


@pytest.mark.parametrize(
    "family, sizes, tested",
    [
        ("crate", ("tiny", "small", "large"), "base"),
        ("vit", ("tiny", "small", "large"), "base"),
        ("tost_vision", ("tiny", "medium"), "small"),
    ],
)
def test_every_smoke_sibling_runs_the_same_smoke_as_the_one_trained_end_to_end(family, sizes, tested):
    """tests/test_e2e.py trains one smoke recipe per family; its size siblings differ from it only
    in their run directory (and the full recipes they name, which a smoke run overrides)."""

    def smoke(size: str) -> dict:
        cfg = asdict(load_config([f"+exp={family}_{size}_smoke"]))
        cfg.pop("run_dir")
        return cfg

    reference = smoke(tested)
    for size in sizes:
        assert smoke(size) == reference, size


def test_crate_flop_count_matches_torch():
    """torch counts the matmuls CRATE really runs in forward + backward: the dictionary's two per
    token, MSSA's attention and every Linear's. The model's count differs in one known way: it
    charges the patch projection for every token, the class token too, which has no patch."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = ModelConfig(name="crate", n_layer=2, n_head=2, n_embd=32, image_size=16, patch_size=4, num_classes=10)
    model = build_model(cfg)
    images, labels = torch.randn(3, 3, 16, 16), torch.randint(0, 10, (3,))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(images, labels).backward()
    class_token_projection = 6 * model.patch_embed.proj.weight.numel() / model.n_tokens
    counted_per_token = counter.get_total_flops() / (3 * model.n_tokens)
    assert counted_per_token == pytest.approx(model.flops_per_token() - class_token_projection, rel=1e-12)
    assert model.blocks[0].ista.flops_per_token() == 12 * 32 * 32
