"""ViT: the image classifier skeleton with a convolutional patch stem and softmax-attention
blocks (timm's layout: pre-norm, biases, GELU MLP of ratio 4), the baseline of CRATE and ToST."""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn

from pretrain.config import ModelConfig
from pretrain.models.attention import SelfAttention
from pretrain.models.layers import Block
from pretrain.models.vision import ClassTokenClassifier, num_patches


class ConvPatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, N, D): one P x P stride-P convolution, i.e. a Linear on each patch."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.n_embd, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class ViT(ClassTokenClassifier):
    def __init__(self, cfg: ModelConfig) -> None:
        attention = partial(SelfAttention, causal=False, n_tokens=num_patches(cfg) + 1)
        super().__init__(cfg, ConvPatchEmbed(cfg), [Block(cfg, attention) for _ in range(cfg.n_layer)])
