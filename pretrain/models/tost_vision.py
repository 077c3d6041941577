"""ToST for images: TSSA blocks in XCiT's skeleton (the reference network), or in ViT's.

`model.skeleton=xcit`: a convolutional patch stem (stride-2 3x3 convolutions with BatchNorm and
GELU), a Fourier encoding of each patch's (row, column) added to its token, TSSA blocks over the
patch tokens only, then `class_attention_layers` class-attention layers in which a class token
reads the patches (CaiT's design) and is the image's feature. `model.skeleton=vit`: ViT's
layout with TSSA as the mixer.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.config import ModelConfig
from pretrain.errors import UserError
from pretrain.models.layers import MLP, Block, layer_scale, merge_heads, split_heads
from pretrain.models.tost import TSSA
from pretrain.models.vision import ClassTokenClassifier, ImageClassifier
from pretrain.models.vit import ConvPatchEmbed

SKELETONS = ("xcit", "vit")


class ConvStem(nn.Module):
    """(B, C, H, W) -> (B, N, D) through log2(P) stride-2 3x3 convolutions whose widths double up
    to D (D/8, D/4, D/2, D for P = 16), BatchNorm after each, GELU between."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        n = int(math.log2(cfg.patch_size))
        if 2**n != cfg.patch_size or cfg.n_embd % 2 ** (n - 1):
            raise UserError(
                f"model.skeleton=xcit needs model.patch_size a power of 2 (not {cfg.patch_size}) "
                f"and model.n_embd divisible by patch_size / 2"
            )
        widths = [cfg.in_chans] + [cfg.n_embd // 2 ** (n - 1 - i) for i in range(n)]
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(itertools.pairwise(widths)):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out)]
            if i < n - 1:
                layers.append(nn.GELU())
        self.convs = nn.Sequential(*layers)

    def forward(self, images: Tensor) -> Tensor:
        return self.convs(images).flatten(2).transpose(1, 2)


class FourierPositions(nn.Module):
    """A patch at (row, column) of an h x w grid -> sin and cos of its normalised coordinates at
    F geometric frequencies each (4F features) -> Linear(4F, D), added to its token."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.features = cfg.fourier_features
        self.proj = nn.Linear(4 * cfg.fourier_features, cfg.n_embd)

    def forward(self, h: int, w: int, device: torch.device) -> Tensor:
        """(h * w, D), row-major like the tokens."""
        frequencies = 10000.0 ** (-torch.arange(self.features, device=device) / self.features)  # (F,)
        rows = torch.arange(1, h + 1, device=device) / h * 2 * math.pi  # (h,) in (0, 2 pi]
        cols = torch.arange(1, w + 1, device=device) / w * 2 * math.pi
        angle_r = rows[:, None, None] * frequencies  # (h, 1, F)
        angle_c = cols[None, :, None] * frequencies  # (1, w, F)
        grid = torch.cat(
            [
                angle_r.sin().expand(h, w, -1),
                angle_r.cos().expand(h, w, -1),
                angle_c.sin().expand(h, w, -1),
                angle_c.cos().expand(h, w, -1),
            ],
            dim=-1,
        )
        return self.proj(grid.reshape(h * w, 4 * self.features))


class ClassAttention(nn.Module):
    """The class token (query) attends to itself and every patch (keys, values)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_embd = cfg.n_head, cfg.n_embd
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.out_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, 1 + N, D) -> the class token's update (B, 1, D)."""
        q, k, v = (split_heads(t, self.n_head) for t in self.qkv(x).split(self.n_embd, dim=2))
        return self.out_proj(merge_heads(F.scaled_dot_product_attention(q[:, :, :1], k, v)))


class ClassAttentionBlock(nn.Module):
    """cls = cls + g1 * CA(LN([cls; patches])); cls = cls + g2 * MLP(LN(cls)); patches unchanged."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attn = ClassAttention(cfg)
        self.ls_1 = layer_scale(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.ls_2 = layer_scale(cfg)

    def forward(self, x: Tensor) -> Tensor:
        cls = x[:, :1] + self.ls_1(self.attn(self.ln_1(x)))
        cls = cls + self.ls_2(self.mlp(self.ln_2(cls)))
        return torch.cat([cls, x[:, 1:]], dim=1)


class ToSTXCiT(ImageClassifier):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, [Block(cfg, TSSA) for _ in range(cfg.n_layer)])
        self.patch_size = cfg.patch_size
        self.stem = ConvStem(cfg)
        self.positions = FourierPositions(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.n_embd))
        self.class_attention = nn.ModuleList(ClassAttentionBlock(cfg) for _ in range(cfg.class_attention_layers))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self._init_linear()

    def embed(self, images: Tensor) -> Tensor:
        h, w = images.shape[2] // self.patch_size, images.shape[3] // self.patch_size
        return self.stem(images) + self.positions(h, w, images.device)  # (B, N, D): patches only

    def pool(self, x: Tensor) -> Tensor:
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)
        for block in self.class_attention:
            x = block(x)
        return x[:, 0]

    def no_weight_decay(self) -> set[str]:
        return {"cls_token"} | {f"blocks.{i}.attn.temp" for i in range(len(self.blocks))}


class ToSTViT(ClassTokenClassifier):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, ConvPatchEmbed(cfg), [Block(cfg, TSSA) for _ in range(cfg.n_layer)])


def tost_vision(cfg: ModelConfig) -> ImageClassifier:
    """ToST for images in the skeleton `model.skeleton` names."""
    if cfg.skeleton not in SKELETONS:
        raise UserError(f"model.skeleton={cfg.skeleton!r} is not one of {', '.join(SKELETONS)}")
    return ToSTXCiT(cfg) if cfg.skeleton == "xcit" else ToSTViT(cfg)
