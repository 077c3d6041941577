"""GPT-2: the causal LM skeleton with multi-head softmax attention (the baseline)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.config import ModelConfig
from pretrain.models.layers import TokenMixer, merge_heads, split_heads
from pretrain.models.lm import CausalLM


class CausalSelfAttention(TokenMixer):
    """Multi-head causal softmax attention with a fused qkv projection."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.n_embd = cfg.n_embd
        self.seq_len = cfg.seq_len
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.out_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (split_heads(t, self.n_head) for t in self.qkv(x).split(self.n_embd, dim=2))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # (B, K, T, p)
        return self.out_proj(merge_heads(y))

    def flops_per_token(self) -> float:
        # q k^T and attn @ v: 2 * 2 * T * D forward per token, x3 with backward (PaLM / nanoGPT).
        return 12 * self.n_embd * self.seq_len


class GPT2LM(CausalLM):
    """GPT-2 language model: the causal LM skeleton with softmax attention."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, mixer=CausalSelfAttention)
