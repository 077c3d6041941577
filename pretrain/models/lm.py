"""The causal language model skeleton (nanoGPT's GPT) with a pluggable token mixer.

GPT-2 and ToST are this class with softmax attention or causal TSSA in every block; all the
rest (embeddings, blocks, tied head, init, loss, counting) lives here once.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.config import ModelConfig
from pretrain.models.layers import Block, TokenMixer


class CausalLM(nn.Module):
    """Token + position embeddings -> n_layer blocks -> final LN -> lm_head tied to wte."""

    def __init__(self, cfg: ModelConfig, mixer: Callable[[ModelConfig], TokenMixer]) -> None:
        super().__init__()
        self.seq_len = cfg.seq_len
        self.vocab_size = cfg.vocab_size
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, mixer) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one (V, D) matrix embeds and un-embeds
        self._init_weights(cfg.n_layer)

    def _init_weights(self, n_layer: int) -> None:
        """GPT-2 init of Linear and Embedding only; mixer and LayerScale parameters keep their own.

        Each residual branch's last Linear (`out_proj`) gets std 0.02 / sqrt(2 * n_layer), so the
        residual stream's variance does not grow with depth (2 branches per block).
        """
        residual_std = 0.02 / math.sqrt(2 * n_layer)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = residual_std if name.endswith("out_proj") else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def embed(self, input_ids: Tensor) -> Tensor:
        """Token plus position embeddings (B, T, D) of input_ids (B, T), which fit the position table."""
        T = input_ids.size(1)
        if T > self.seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than model.seq_len={self.seq_len}")
        return self.wte(input_ids) + self.wpe(torch.arange(T, device=input_ids.device))

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, document_ids: Tensor | None = None) -> Tensor:
        """Logits (B, T, V), or given labels the mean cross-entropy in fp32 (-100 is ignored).

        document_ids (B, T) (pretrain.data.tokens.document_ids) keep the documents packed into a
        block apart: no token's output depends on an earlier document's tokens. The loss still
        covers every token; position embeddings stay those of the block."""
        x = self.drop(self.embed(input_ids))  # (B, T, D)
        for block in self.blocks:
            x = block(x, document_ids=document_ids)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        if labels is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, self.vocab_size), labels.reshape(-1), ignore_index=-100)

    def no_weight_decay(self) -> set[str]:
        """Matrix-shaped parameters not to decay: the position table and the mixers' own picks."""
        return {"wpe.weight"} | {
            f"blocks.{i}.attn.{name}" for i, block in enumerate(self.blocks) for name in block.attn.no_weight_decay()
        }

    def num_params(self, exclude_position_embeddings: bool = True) -> int:
        """Parameter count as papers report it: tied head counted once, position table excluded."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields the tied matrix once
        return n - self.wpe.weight.numel() if exclude_position_embeddings else n

    def flops_per_token(self) -> float:
        """Training FLOPs per token, for MFU.

        Every weight of a Linear (the tied head included, once) costs 2 FLOPs per token forward
        (multiply, add) and 4 backward (gradients for input and weight): 6 per weight. The token
        mixer adds its own work, which no weight count sees: softmax attention 12 * T * D per
        layer (q.k^T and a.v, 2 * 2 * T * D forward, x3), i.e. O(T^2 D) per sequence; causal TSSA
        36 * D per layer, i.e. O(T D) per sequence (see each mixer's `flops_per_token`).
        Embedding lookups, norms and the MLP's GELU are left out, as in the PaLM/nanoGPT count.
        tests/test_models.py checks this against a hand count and torch's FlopCounterMode.
        """
        matmul_params = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * matmul_params + sum(block.attn.flops_per_token() for block in self.blocks)
