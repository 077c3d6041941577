"""tools/convert.py for the image classifiers: ViT as timm's VisionTransformer (export-timm), and
export-safetensors for every vision family (ViT, CRATE, ToST). Every model is built here from a
config with random weights; nothing is downloaded."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
from helpers import PROVENANCE, make_torchvision_importable, random_model, tool, weights_dir
from safetensors import safe_open
from safetensors.torch import load_file

from pretrain.config import ModelConfig, load_config
from pretrain.interop.timm_vit import architecture
from pretrain.interop.weights import load_weights
from pretrain.models import build_model

CONVERT = tool("convert")


def import_timm():
    """timm, a declared test dependency (the dev extra): where it does not import, the test fails.

    PyPI's torchvision is a CUDA build whose compiled operators do not load beside this machine's
    CPU torch, so `import torchvision` (which timm does, for FrozenBatchNorm2d) fails with
    "operator torchvision::nms does not exist". make_torchvision_importable (helpers.py) then
    declares the schemas of the two operators torchvision registers fake kernels for, nms and
    qnms, without kernels: a ViT calls none of torchvision's operators."""
    make_torchvision_importable()
    import timm

    return timm


@pytest.fixture(scope="module")
def timm():
    return import_timm()


def model_config(exp: str, *overrides: str) -> ModelConfig:
    return load_config([f"+exp={exp}", *overrides]).model


def convert(*argv: str) -> int:
    return CONVERT.main([str(a) for a in argv])


def images(cfg: ModelConfig, batch: int = 4, seed: int = 1) -> torch.Tensor:
    size = (batch, cfg.in_chans, cfg.image_size, cfg.image_size)
    return torch.randn(size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["model.layerscale_init=0.1"],
        pytest.param(["model.layerscale_init=0.0"], marks=pytest.mark.slow),  # the fast part keeps a variant or two
        pytest.param(["model.bias=false"], marks=pytest.mark.slow),
        ["model.gelu_approximate=tanh", "model.in_chans=1", "model.num_classes=7", "model.image_size=48"],
    ],
    ids=["as-trained", "layerscale", "layerscale-from-0", "no-biases", "tanh-gelu-1-channel"],
)
def test_vit_loads_in_timm_with_the_same_logits(overrides, timm, tmp_path) -> None:
    cfg = model_config("vit_tiny_smoke", *overrides)
    model = random_model(cfg)
    out = tmp_path / "timm"
    assert convert("export-timm", weights_dir(model, cfg, tmp_path / "w"), out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]

    # timm's own loader, from the directory alone (pretrained=True loads strictly).
    theirs = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = images(cfg)
    with torch.no_grad():
        difference = (theirs(x) - model(x)).abs().max().item()
    assert difference < 1e-4, difference

    # Without the local-dir source: the architecture, its model_args and the state dict, strictly.
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224"
    rebuilt = timm.create_model(config["architecture"], pretrained=False, **config["model_args"]).eval()
    state = load_file(out / "model.safetensors")
    assert set(state) == set(rebuilt.state_dict())
    assert not rebuilt.load_state_dict(state, strict=True).missing_keys
    with torch.no_grad():
        assert torch.equal(rebuilt(x), theirs(x))
    assert ("blocks.0.ls1.gamma" in state) == (cfg.layerscale_init is not None)
    if not cfg.bias:  # timm's biases where ours has none: zeros
        assert not state["blocks.1.norm2.bias"].any() and not state["blocks.1.attn.qkv.bias"].any()

    data = timm.data.resolve_model_data_config(theirs)
    assert data["input_size"] == (cfg.in_chans, cfg.image_size, cfg.image_size)
    normalisation = (tuple(data["mean"]), tuple(data["std"]), data["crop_pct"], data["interpolation"])
    assert normalisation == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0.875, "bicubic")  # our pipeline's
    assert config["whitebox"] == {"model": asdict(cfg), "provenance": PROVENANCE}


def test_timm_names_the_sizes_it_has_and_takes_the_run_normalisation(timm, tmp_path) -> None:
    """The four patch-16 224 px sizes by their own names; any other model by the nearest, reshaped
    by model_args; a run's data.image settings, when the provenance carries them, in pretrained_cfg."""
    sizes = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}
    for size, (width, depth, heads) in sizes.items():
        cfg = ModelConfig(name="vit", n_embd=width, n_layer=depth, n_head=heads, image_size=224, patch_size=16)
        assert architecture(cfg) == f"vit_{size}_patch16_224"
        assert timm.is_model(architecture(cfg))
    assert architecture(ModelConfig(name="vit", n_embd=768, n_layer=12, n_head=12, image_size=384)) == (
        "vit_base_patch16_224"
    )
    assert architecture(ModelConfig(name="vit", n_embd=512, n_layer=8, n_head=8)) == "vit_small_patch16_224"

    cfg = model_config("vit_tiny_smoke", "model.n_embd=192", "model.n_head=3", "model.image_size=224")
    cfg = ModelConfig(**{**asdict(cfg), "patch_size": 16, "n_layer": 1})
    image = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "eval_crop_fraction": 1.0}
    source = weights_dir(random_model(cfg), cfg, tmp_path / "w", {**PROVENANCE, "data_image": image})
    assert convert("export-timm", source, tmp_path / "timm") == 0
    theirs = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True)
    assert len(theirs.blocks) == 1 and theirs.embed_dim == 192
    data = timm.data.resolve_model_data_config(theirs)
    assert (tuple(data["mean"]), tuple(data["std"]), data["crop_pct"]) == ((0.5,) * 3, (0.25,) * 3, 1.0)


def test_a_bf16_timm_export_is_the_weights_rounded_to_bf16(timm, tmp_path) -> None:
    cfg = model_config("vit_tiny_smoke", "model.layerscale_init=0.1")
    model = random_model(cfg)
    out = tmp_path / "timm"
    assert convert("export-timm", weights_dir(model, cfg, tmp_path / "w"), out, "--dtype", "bf16") == 0
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    theirs = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # fp32, as timm builds it
    rounded = build_model(cfg).eval()
    rounded.load_state_dict({k: v.bfloat16().float() for k, v in model.state_dict().items()})
    x = images(cfg)
    with torch.no_grad():
        assert (theirs(x) - rounded(x)).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    ("exp", "overrides"),
    [
        ("vit_tiny_smoke", []),
        ("crate_tiny_smoke", []),
        ("tost_vision_tiny_smoke", []),
        pytest.param("tost_vision_tiny_smoke", ["model.skeleton=vit"], marks=pytest.mark.slow),
    ],
    ids=["vit", "crate", "tost_vision-xcit", "tost_vision-vit"],
)
def test_safetensors_export_rebuilds_the_same_model(exp, overrides, tmp_path) -> None:
    cfg = model_config(exp, *overrides)
    model = random_model(cfg)
    source = weights_dir(model, cfg, tmp_path / "w")
    assert convert("export-safetensors", source, tmp_path / "out") == 0

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model"] == asdict(cfg) and config["provenance"] == PROVENANCE
    back = load_weights(str(tmp_path / "out"), {})
    rebuilt = build_model(back.model).eval()
    rebuilt.load_state_dict(back.tensors)
    x = images(cfg)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))

    assert convert("export-safetensors", source, tmp_path / "bf16", "--dtype", "bf16") == 0
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys() if f.get_tensor(k).is_floating_point()}
    assert dtypes == {torch.bfloat16}
    half = load_weights(str(tmp_path / "bf16"), {})
    assert all(torch.equal(half.tensors[k], v.bfloat16().float()) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("exp", "overrides", "flags", "message"),
    [
        ("crate_tiny_smoke", [], [], "export-timm has no export for model.name=crate (it exports vit)"),
        ("tost_vision_tiny_smoke", [], [], "export-timm has no export for model.name=tost_vision"),
        ("vit_tiny_smoke", ["model.norm_eps=1e-5"], [], "model.norm_eps=1e-05: timm's VisionTransformer fixes"),
        ("vit_tiny_smoke", [], ["--max-shard-size", "10KB"], "export-timm takes no --max-shard-size"),
    ],
    ids=["crate", "tost_vision", "norm-eps", "shards"],
)
def test_timm_exports_refused_with_one_line_and_nothing_written(exp, overrides, flags, message, tmp_path, capsys):
    cfg = model_config(exp, *overrides)
    source = weights_dir(random_model(cfg), cfg, tmp_path / "w")
    assert convert("export-timm", source, tmp_path / "timm", *flags) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]  # no output, no staging left behind


def test_an_existing_timm_output_is_kept_without_overwrite(tmp_path, capsys) -> None:
    cfg = model_config("vit_tiny_smoke")
    source = weights_dir(random_model(cfg), cfg, tmp_path / "w")
    out = tmp_path / "timm"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert convert("export-timm", source, out) == 2
    err = capsys.readouterr().err
    assert "already exists: pass --overwrite" in err and err.count("\n") == 1
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert convert("export-timm", source, out, "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["timm", "w"]


def test_a_vision_checkpoints_provenance_carries_the_runs_normalisation() -> None:
    """What export-timm writes into pretrained_cfg comes from the run's data.image; a language
    model's provenance has none."""
    from pretrain.checkpoint.export import CommittedStep
    from pretrain.config import load_config, redacted

    for exp, expected in (("vit_tiny_smoke", True), ("tost_gpt2_smoke", False)):
        overrides = [f"+exp={exp}", *(["data.image.mean=[0.5,0.5,0.5]"] if expected else [])]
        config = redacted(load_config(overrides))
        step = CommittedStep("store/step_00000003", 3, {"config": config, "tokens_seen": 9}, "unused")
        provenance = step.provenance()
        assert ("data_image" in provenance) is expected
        if expected:
            assert provenance["data_image"]["mean"] == [0.5, 0.5, 0.5]
