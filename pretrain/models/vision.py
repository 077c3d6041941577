"""The image classifier skeleton shared by ViT and CRATE: patches -> tokens -> blocks -> CLS head.

Models differ in how an image becomes patch tokens (`patch_embed`) and in their blocks; the rest
(class token, learned position table, final norm, linear head on the class token, the loss,
init, counting) lives here once, with the same `blocks` list every engine shards.
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
    """[CLS; patch tokens] + positions -> blocks -> LN -> Linear(D, classes) on the CLS token."""

    def __init__(self, cfg: ModelConfig, patch_embed: nn.Module, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.label_smoothing = cfg.label_smoothing
        self.patch_embed = patch_embed  # (B, C, H, W) -> (B, N, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.n_embd))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches(cfg) + 1, cfg.n_embd))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.n_embd, cfg.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """ViT's init (truncated normal, std 0.02) for Linear weights and the two tables; blocks
        with parameters of their own (a CRATE dictionary) initialise those themselves."""
        for table in (self.cls_token, self.pos_embed):
            nn.init.trunc_normal_(table, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def tokens(self, images: Tensor) -> Tensor:
        """The tokens (B, N + 1, D) entering the first block."""
        patches = self.patch_embed(images)  # (B, N, D)
        cls = self.cls_token.expand(len(patches), -1, -1)
        return self.drop(torch.cat([cls, patches], dim=1) + self.pos_embed)

    def forward(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        """Logits (B, classes), or given labels (B,) the label-smoothed cross-entropy in fp32."""
        x = self.tokens(images)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x[:, 0]))  # (B, classes), from the CLS token
        if labels is None:
            return logits
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)

    def no_weight_decay(self) -> set[str]:
        """The class token and position table are not decayed (norms and biases, 1-D, never are)."""
        return {"cls_token", "pos_embed"}

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> float:
        """Training FLOPs per token, for MFU: 6 per Linear/Conv weight (the head's spread over an
        image's tokens: it sees the CLS token only), plus each block's work beyond its weight
        matmuls (see its `flops_per_token`)."""
        weights = sum(m.weight.numel() for m in self.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
        head = self.head.weight.numel()
        per_image_head = head / self.pos_embed.shape[1]
        return 6 * (weights - head + per_image_head) + sum(block.flops_per_token() for block in self.blocks)
