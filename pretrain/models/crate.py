"""CRATE: a white-box transformer whose layers are unrolled steps of sparse rate reduction.

Each layer compresses the tokens against per-head subspaces (MSSA: attention whose queries,
keys and values are the same projection W = U x) and then sparsifies them against a learned
dictionary D by one ISTA step. There is one residual per layer, around MSSA; none after ISTA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.config import ModelConfig
from pretrain.models.layers import TokenMixer, merge_heads, split_heads
from pretrain.models.vision import ClassTokenClassifier, num_patches


class MSSA(TokenMixer):
    """Multi-head subspace self-attention: O_k = softmax(W_k W_k^T / sqrt(p)) W_k with W = U x."""

    def __init__(self, cfg: ModelConfig, *, causal: bool, n_tokens: int) -> None:
        super().__init__()
        self.n_head, self.n_embd, self.n_tokens, self.causal = cfg.n_head, cfg.n_embd, n_tokens, causal
        self.U = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)  # the heads' subspace bases, stacked
        self.out_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        w = split_heads(self.U(x), self.n_head)  # (B, K, N, p): query, key and value alike
        o = F.scaled_dot_product_attention(w, w, w, is_causal=self.causal)  # (B, K, N, p)
        return self.out_proj(merge_heads(o))

    def flops_per_token(self) -> float:
        # W W^T and A W, as softmax attention's q k^T and a v: 12 * N * D per token, with backward.
        return 12 * self.n_embd * self.n_tokens


class ISTA(nn.Module):
    """One ISTA step towards a sparse code of x in dictionary D (d, d), in row form:
    ReLU(x + eta * (x D - x D^T D) - eta * lambda), i.e. ReLU(x + eta D^T (x - D x) - eta lambda)
    for column vectors."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.step, self.lam = cfg.ista_step, cfg.ista_lambda
        self.D = nn.Parameter(torch.empty(cfg.n_embd, cfg.n_embd))
        nn.init.kaiming_uniform_(self.D, a=0)

    def forward(self, x: Tensor) -> Tensor:
        residual = x - F.linear(x, self.D)  # x - D x          (B, N, d)
        gradient_step = F.linear(residual, self.D.t())  # D^T (x - D x)
        return F.relu(x + self.step * gradient_step - self.step * self.lam)

    def flops_per_token(self) -> float:
        """D is a bare parameter, which the model's count of Linear weights does not see, and it
        is used twice per token (D x, then D^T r): 6 FLOPs per weight per use."""
        return 2 * 6 * self.D.numel()


class CRATEBlock(nn.Module):
    """Z_half = Z + MSSA(LN1(Z)); Z_next = ISTA(LN2(Z_half))."""

    def __init__(self, cfg: ModelConfig, *, causal: bool, n_tokens: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attn = MSSA(cfg, causal=causal, n_tokens=n_tokens)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.ista = ISTA(cfg)

    def forward(self, z: Tensor) -> Tensor:
        z = z + self.attn(self.ln_1(z))
        return self.ista(self.ln_2(z))

    def flops_per_token(self) -> float:
        return self.attn.flops_per_token() + self.ista.flops_per_token()


class CRATEPatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, N, D): each patch flattened channel-last, LN -> Linear -> LN."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        patch_dim = cfg.in_chans * cfg.patch_size**2
        self.ln_in = nn.LayerNorm(patch_dim, eps=cfg.norm_eps)
        self.proj = nn.Linear(patch_dim, cfg.n_embd)
        self.ln_out = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)

    def forward(self, images: Tensor) -> Tensor:
        return self.ln_out(self.proj(self.ln_in(patchify(images, self.patch_size))))


def patchify(images: Tensor, P: int) -> Tensor:
    """(B, C, H, W) -> (B, N, P*P*C): patches in row-major order, each flattened row by row with
    the channels innermost (channel-last)."""
    B, C, H, W = images.shape
    patches = images.view(B, C, H // P, P, W // P, P).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, P, P, C)
    return patches.reshape(B, (H // P) * (W // P), P * P * C)


class CRATE(ClassTokenClassifier):
    def __init__(self, cfg: ModelConfig) -> None:
        n_tokens = num_patches(cfg) + 1
        blocks = [CRATEBlock(cfg, causal=False, n_tokens=n_tokens) for _ in range(cfg.n_layer)]
        super().__init__(cfg, CRATEPatchEmbed(cfg), blocks)
