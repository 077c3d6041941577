"""The image classifier skeletons: image -> tokens -> blocks -> one feature -> linear head.

Models differ in how an image becomes tokens (`embed`), in their blocks, and in how the blocks'
output becomes one feature (`pool`); the rest (final norm, head, loss, init, counting) lives here
once, with the same `blocks` list every engine shards. ViT and CRATE share the class-token
layout (ClassTokenClassifier); ToST's reference network has its own (tost_vision.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.config import ModelConfig
from pretrain.errors import UserError


def num_patches(cfg: ModelConfig) -> int:
    if cfg.image_size % cfg.patch_size:
        raise UserError(f"model.image_size={cfg.image_size} is not a multiple of model.patch_size={cfg.patch_size}")
    return (cfg.image_size // cfg.patch_size) ** 2


class ImageClassifier(nn.Module):
    """Image -> tokens (`embed`) -> blocks -> a feature per image (`pool`) -> LN -> linear head."""

    def __init__(self, cfg: ModelConfig, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.label_smoothing = cfg.label_smoothing
        self.n_tokens = num_patches(cfg) + 1  # patches and the class token
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.n_embd, cfg.num_classes)

    def embed(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> the tokens (B, N', D) entering the first block."""
        raise NotImplementedError

    def pool(self, x: Tensor) -> Tensor:
        """The blocks' output (B, N', D) -> one feature per image (B, D)."""
        raise NotImplementedError

    def _init_linear(self) -> None:
        """ViT's init: truncated normal (std 0.02) for every Linear weight, zero biases."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        """Logits (B, classes), or given labels (B,) the label-smoothed cross-entropy in fp32."""
        x = self.embed(images)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(self.pool(x)))  # (B, classes)
        if labels is None:
            return logits
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)

    def no_weight_decay(self) -> set[str]:
        """Matrix-shaped parameters not to decay (norms and biases, 1-D, never are)."""
        return set()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> float:
        """Training FLOPs per token, for MFU: 6 per Linear/Conv weight (the head's spread over an
        image's tokens: it sees one feature per image), plus each block's work beyond its weight
        matmuls (see its `flops_per_token`). Convolutions are counted as if applied once per token."""
        weights = sum(m.weight.numel() for m in self.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
        head = self.head.weight.numel()
        return 6 * (weights - head + head / self.n_tokens) + sum(block.flops_per_token() for block in self.blocks)


class ClassTokenClassifier(ImageClassifier):
    """ViT's layout: [CLS; patch tokens] + a learned position table -> blocks -> the CLS token."""

    def __init__(self, cfg: ModelConfig, patch_embed: nn.Module, blocks: list[nn.Module]) -> None:
        super().__init__(cfg, blocks)
        self.patch_embed = patch_embed  # (B, C, H, W) -> (B, N, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.n_embd))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.n_tokens, cfg.n_embd))
        self.drop = nn.Dropout(cfg.dropout)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self._init_linear()  # blocks with parameters of their own (a CRATE dictionary) keep their init

    def embed(self, images: Tensor) -> Tensor:
        patches = self.patch_embed(images)  # (B, N, D)
        cls = self.cls_token.expand(len(patches), -1, -1)
        return self.drop(torch.cat([cls, patches], dim=1) + self.pos_embed)

    def pool(self, x: Tensor) -> Tensor:
        return x[:, 0]

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed"} | {
            f"blocks.{i}.attn.{name}"
            for i, block in enumerate(self.blocks)
            for name in getattr(block.attn, "no_weight_decay", set)()
        }
