"""Our ViT as timm's VisionTransformer: `timm.create_model("local-dir:" + directory, pretrained=True)`.

The export is what timm's own `save_for_hf` writes: the state dict by timm's names in
`model.safetensors` and a `config.json` holding the architecture, the `model_args` that rebuild it
and the `pretrained_cfg` (input size and normalisation). Without timm's local-dir source (older
timm), the same model is `timm.create_model(config["architecture"], pretrained=False,
**config["model_args"])` followed by `load_state_dict(safetensors.torch.load_file(...))`.

The architecture is timm's `vit_{tiny,small,base,large}_patch16_224` when width, depth, heads,
patch 16 and 224 px all match one of them; otherwise the one of those four nearest in width (then
depth), which `model_args` (always written whole) reshapes into this model.

The two networks are the same where it matters: a P x P stride-P convolution stem with a bias,
[CLS; patches] + a learned position table over both (timm's class_token=True,
no_embed_class=False), pre-norm blocks with a fused q|k|v projection split head by head, MLP of
ratio 4, optional LayerScale (timm's init_values; gains named ls1/ls2.gamma), and the head on the
final LayerNorm of the class token (timm norms every token and takes the first: the same numbers).
Where they differ:
- model.bias=false: timm's LayerNorms always have a bias, and its qkv/proj/fc biases, though
  optional in recent timm, are kept here so that the export is a plain timm ViT any version
  loads: they are written as zeros, which computes exactly the same;
- model.gelu_approximate=tanh: timm's act_layer="gelu_tanh" (the same torch kernel);
- model.norm_eps: timm's ViT fixes LayerNorm eps at 1e-6 and config.json cannot carry a norm
  layer of another eps (a callable), so any other value is refused;
- a LayerScale whose init was 0: timm reads init_values=0 as "no LayerScale", so the config says
  1e-5 (only a fresh model's starting value: the exported gains are the trained ones);
- dropout acts in other places (timm also drops after the MLP's activation) and is not carried:
  timm's defaults (none) apply, as they do at evaluation;
- timm loads one weights file: --max-shard-size is refused.
The normalisation and crop are the run's data.image settings when the provenance carries them
(`provenance["data_image"]`), else our pipeline's defaults (ImageNet's mean and std, crop 0.875,
bicubic, as pretrain/data/build.py's evaluation transform uses them).
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

from torch import Tensor

from pretrain.config import ImageConfig, ModelConfig
from pretrain.errors import UserError
from pretrain.interop.hf_gpt2 import WHITEBOX_KEY
from pretrain.interop.weights import DTYPES, Weights, write_json, write_safetensors

TIMM_NORM_EPS = 1e-6  # timm.layers.LayerNorm's default, which its VisionTransformer never changes
PATCH, IMAGE = 16, 224
# timm's ViT sizes: name -> (embed_dim, depth, num_heads).
SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}
ACTIVATIONS = {"none": None, "tanh": "gelu_tanh"}  # model.gelu_approximate -> timm's act_layer (None: nn.GELU)
LAYERSCALE_FOR_ZERO = 1e-5
# Our name in a block -> timm's name in a block (LayerScale only when the model has it).
BLOCK_NAMES = {
    "ln_1": "norm1",
    "attn.qkv": "attn.qkv",
    "attn.out_proj": "attn.proj",
    "ln_2": "norm2",
    "mlp.fc": "mlp.fc1",
    "mlp.out_proj": "mlp.fc2",
}
LAYERSCALE_NAMES = {"ls_1.gamma": "ls1.gamma", "ls_2.gamma": "ls2.gamma"}
# Outside the blocks, the names agree; the final norm, head and stem are biased whatever model.bias says.
TOP_NAMES = (
    "cls_token",
    "pos_embed",
    "patch_embed.proj.weight",
    "patch_embed.proj.bias",
    "norm.weight",
    "norm.bias",
    "head.weight",
    "head.bias",
)


def architecture(model: ModelConfig) -> str:
    """timm's exact name for this model, or the nearest of its patch-16 224 px ViTs."""
    shape = (model.n_embd, model.n_layer, model.n_head)
    for size, dims in SIZES.items():
        if dims == shape and (model.patch_size, model.image_size) == (PATCH, IMAGE):
            return f"vit_{size}_patch{PATCH}_{IMAGE}"
    size = min(SIZES, key=lambda s: (abs(SIZES[s][0] - model.n_embd), abs(SIZES[s][1] - model.n_layer)))
    return f"vit_{size}_patch{PATCH}_{IMAGE}"


def check_exportable(model: ModelConfig) -> None:
    if model.norm_eps != TIMM_NORM_EPS:
        raise UserError(
            f"model.norm_eps={model.norm_eps}: timm's VisionTransformer fixes its LayerNorm eps at {TIMM_NORM_EPS} "
            "(its config.json cannot carry another), so this model cannot become a timm ViT; use export-safetensors"
        )
    if model.gelu_approximate not in ACTIVATIONS:
        raise UserError(f"model.gelu_approximate={model.gelu_approximate!r} has no timm activation")


def model_args(model: ModelConfig) -> dict[str, Any]:
    """The VisionTransformer arguments that rebuild this model, whatever the architecture's defaults."""
    args: dict[str, Any] = {
        "img_size": model.image_size,
        "patch_size": model.patch_size,
        "in_chans": model.in_chans,
        "num_classes": model.num_classes,
        "embed_dim": model.n_embd,
        "depth": model.n_layer,
        "num_heads": model.n_head,
        "mlp_ratio": 4.0,
        "qkv_bias": True,
        "class_token": True,
        "no_embed_class": False,
        "global_pool": "token",
    }
    if model.layerscale_init is not None:
        args["init_values"] = model.layerscale_init or LAYERSCALE_FOR_ZERO
    if ACTIVATIONS[model.gelu_approximate] is not None:
        args["act_layer"] = ACTIVATIONS[model.gelu_approximate]
    return args


def timm_config(model: ModelConfig, provenance: dict[str, Any]) -> dict[str, Any]:
    """config.json in timm's hub format (what timm.models.save_for_hf writes), plus our own record."""
    image = {**asdict(ImageConfig()), **(provenance.get("data_image") or {})}
    return {
        "architecture": architecture(model),
        "num_classes": model.num_classes,
        "num_features": model.n_embd,
        "global_pool": "token",
        "model_args": model_args(model),
        "pretrained_cfg": {
            "custom_load": False,
            "input_size": [model.in_chans, model.image_size, model.image_size],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": image["eval_crop_fraction"],
            "crop_mode": "center",
            "mean": list(image["mean"]),
            "std": list(image["std"]),
            "num_classes": model.num_classes,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
        WHITEBOX_KEY: {"model": asdict(model), "provenance": provenance},
    }


def to_timm(model: ModelConfig, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our ViT's state dict -> timm VisionTransformer's: zero biases where ours has none."""
    check_exportable(model)
    out = {name: tensors[name] for name in TOP_NAMES}
    for i in range(model.n_layer):
        for ours, theirs in BLOCK_NAMES.items():
            weight = tensors[f"blocks.{i}.{ours}.weight"]
            out[f"blocks.{i}.{theirs}.weight"] = weight
            bias = tensors.get(f"blocks.{i}.{ours}.bias")
            out[f"blocks.{i}.{theirs}.bias"] = bias if bias is not None else weight.new_zeros(len(weight))
        if model.layerscale_init is not None:
            for ours, theirs in LAYERSCALE_NAMES.items():
                out[f"blocks.{i}.{theirs}"] = tensors[f"blocks.{i}.{ours}"]
    return out


def export_timm(weights: Weights, directory: str, dtype: str, max_shard_bytes: int | None) -> None:
    """A directory that timm.create_model("local-dir:" + directory, pretrained=True) loads, offline."""
    if max_shard_bytes is not None:
        raise UserError("timm loads its weights from one model.safetensors: export-timm takes no --max-shard-size")
    cast = DTYPES[dtype]
    state = {name: t.to(cast) for name, t in to_timm(weights.model, weights.tensors).items()}
    write_safetensors(state, directory)
    write_json(os.path.join(directory, "config.json"), timm_config(weights.model, weights.provenance))
