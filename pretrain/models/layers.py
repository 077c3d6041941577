"""Building blocks shared by every transformer here: the pre-norm residual block and its parts.

A block is agnostic of how tokens are mixed; the mixer (softmax attention, TSSA, ...) is a
`TokenMixer` handed in by the model, so GPT-2 and ToST differ in exactly one module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from pretrain.config import ModelConfig


class TokenMixer(nn.Module):
    """Maps (B, T, D) -> (B, T, D) by mixing across tokens; the attention slot of a block.

    Contract the models rely on: the last Linear is named `out_proj` (it gets the scaled
    residual init), `flops_per_token` counts the mixing work its weight matmuls do not, and
    `no_weight_decay` names its matrix-shaped parameters that must not be decayed.
    """

    out_proj: nn.Linear

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward) beyond the mixer's weight matmuls."""
        raise NotImplementedError

    def no_weight_decay(self) -> set[str]:
        """Local names of parameters with ndim >= 2 that weight decay must skip."""
        return set()


def split_heads(x: Tensor, n_head: int) -> Tensor:
    """(B, T, D) -> (B, K, T, p): one slice of width p = D / K per head."""
    B, T, D = x.shape
    return x.view(B, T, n_head, D // n_head).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, K, T, p) -> (B, T, D): concatenate the heads again."""
    B, K, T, p = x.shape
    return x.transpose(1, 2).reshape(B, T, K * p)


class MLP(nn.Module):
    """D -> 4D -> D with GELU, exact (erf) or tanh-approximated (model.gelu_approximate)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU(approximate=cfg.gelu_approximate)
        self.out_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_proj(self.gelu(self.fc(x)))


class LayerScale(nn.Module):
    """Per-channel gain g (D,) on a residual branch; a small init starts deep nets near identity."""

    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


def layer_scale(cfg: ModelConfig) -> nn.Module:
    """LayerScale when cfg.layerscale_init is set, else the identity (plain GPT-2)."""
    if cfg.layerscale_init is None:
        return nn.Identity()
    return LayerScale(cfg.n_embd, cfg.layerscale_init)


class Block(nn.Module):
    """Pre-norm block: x = x + g1 * attn(LN(x)); x = x + g2 * MLP(LN(x))."""

    def __init__(self, cfg: ModelConfig, mixer: Callable[[ModelConfig], TokenMixer]) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)
        self.attn = mixer(cfg)
        self.ls_1 = layer_scale(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg)
        self.ls_2 = layer_scale(cfg)
        self.drop = nn.Dropout(cfg.dropout)  # residual dropout, on both branches

    def forward(self, x: Tensor, state: Any = None, document_ids: Tensor | None = None) -> Tensor:
        """With a mixer's recurrent `state`, x is the next token (B, 1, D) and the mixer steps.
        With document_ids (B, T), the mixer lets no token see an earlier document of the block."""
        h = self.ln_1(x)
        if state is not None:
            mixed = self.attn.step(h, state)
        else:
            mixed = self.attn(h) if document_ids is None else self.attn(h, document_ids=document_ids)
        return self.after_mixer(x, mixed)

    def after_mixer(self, x: Tensor, mixed: Tensor) -> Tensor:
        """The rest of the block, given the mixer's output on LN(x) (however it was computed)."""
        x = x + self.ls_1(self.drop(mixed))
        return x + self.ls_2(self.drop(self.mlp(self.ln_2(x))))

    def flops_per_token(self) -> float:
        """Training FLOPs per token beyond the block's weight matmuls: the mixer's."""
        return self.attn.flops_per_token()
