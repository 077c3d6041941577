"""Multi-head softmax attention: the mixer of the GPT-2 and ViT baselines."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.config import ModelConfig
from pretrain.models.layers import TokenMixer, merge_heads, split_heads


class SelfAttention(TokenMixer):
    """Multi-head softmax attention with a fused qkv projection; `causal` for language.
    `n_tokens` is the sequence length its FLOP count assumes."""

    def __init__(self, cfg: ModelConfig, *, causal: bool, n_tokens: int) -> None:
        super().__init__()
        self.n_head, self.n_embd, self.n_tokens = cfg.n_head, cfg.n_embd, n_tokens
        self.causal, self.dropout = causal, cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.out_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: Tensor, document_ids: Tensor | None = None) -> Tensor:
        """x (B, N, D); with document_ids (B, N), a token attends to its own document only."""
        q, k, v = (split_heads(t, self.n_head) for t in self.qkv(x).split(self.n_embd, dim=2))
        dropout_p = self.dropout if self.training else 0.0
        if document_ids is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=self.causal)  # (B, K, N, p)
        else:
            # Block-diagonal (and causal) mask. On CUDA an explicit mask takes SDPA off its flash
            # kernel (onto the memory-efficient or math one); the CPU flash kernel takes masks.
            mask = document_ids[:, None, :, None] == document_ids[:, None, None, :]  # (B, 1, N, N)
            if self.causal:
                mask = mask.tril()
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        return self.out_proj(merge_heads(y))

    def flops_per_token(self) -> float:
        # q k^T and attn @ v: 2 * 2 * N * D forward per token, x3 with backward (PaLM / nanoGPT).
        return 12 * self.n_embd * self.n_tokens
