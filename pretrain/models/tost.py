"""Token Statistics Transformer (ToST): attention replaced by Token Statistics Self-Attention.

TSSA has no queries or keys: each head scores a token by its share of the head's per-coordinate
energy, turns the scores into memberships pi over heads, and shrinks the token by the
pi-weighted second moment of its head. Cost is O(T * D); no T x T tensor is ever formed.
Causal TSSA uses inclusive prefix statistics (s <= t), computed with cumsum.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from pretrain.config import ModelConfig
from pretrain.models.layers import TokenMixer, merge_heads, split_heads
from pretrain.models.lm import CausalLM
from pretrain.models.tssa import TSSAState, token_statistics, token_statistics_step


def tssa(w: Tensor, temp: Tensor) -> Tensor:
    """Non-causal TSSA core (vision): w (B, K, N, p), temp (K, 1) -> c (B, K, N, p)."""
    return token_statistics(w, temp, causal=False)[0]


def causal_tssa(w: Tensor, temp: Tensor, denom_bias: Tensor) -> Tensor:
    """Causal TSSA core: token t sees statistics of tokens s <= t; denom_bias (K, max_seq_len)."""
    return token_statistics(w, temp, causal=True, denom_bias=denom_bias)[0]


class TSSA(TokenMixer):
    """Non-causal TSSA layer (vision): shared projection U, per-head temperature, out_proj."""

    def __init__(self, cfg: ModelConfig, out_bias: bool = True) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.n_embd = cfg.n_embd
        self.U = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.temp = nn.Parameter(torch.ones(cfg.n_head, 1))
        self.out_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=out_bias)

    def forward(self, x: Tensor) -> Tensor:
        w = split_heads(self.U(x), self.n_head)  # (B, K, N, p)
        return self.out_proj(merge_heads(tssa(w, self.temp)))

    def flops_per_token(self) -> float:
        # Forward does ~12 elementwise ops per coordinate of w (square, 2 sums over tokens, clamp,
        # 3 divisions, 2 products, coordinate sum, 1 + m, sign); per-head softmax work is O(K),
        # negligible. Backward ~2x forward, so 3 * 12 = 36 FLOPs per coordinate: 36 * D per token.
        # The causal form does the same with prefix sums in place of sums.
        return 36 * self.n_embd

    def no_weight_decay(self) -> set[str]:
        return {"temp"}


class CausalTSSA(TSSA):
    """Causal TSSA layer (language): TSSA over each prefix, with a learned positional prior on
    the head memberships (denom_bias)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, out_bias=cfg.bias)
        self.denom_bias = nn.Parameter(torch.zeros(cfg.n_head, cfg.seq_len))

    def forward(self, x: Tensor) -> Tensor:
        w = split_heads(self.U(x), self.n_head)  # (B, K, T, p)
        c = causal_tssa(w, self.temp, self.denom_bias)  # (B, K, T, p)
        return self.out_proj(merge_heads(c))

    def init_state(self, batch: int, device: torch.device) -> TSSAState:
        p = self.n_embd // self.n_head
        zeros = partial(torch.zeros, dtype=torch.float32, device=device)
        return TSSAState(zeros(batch, self.n_head, p), zeros(batch, self.n_head, p), zeros(batch, self.n_head))

    def step(self, x: Tensor, state: TSSAState) -> Tensor:
        """The recurrent form: x (B, 1, D), the next token, -> its output (B, 1, D), updating
        `state` in place; equal to `forward` on the whole prefix at that position, to rounding."""
        w = split_heads(self.U(x), self.n_head)[:, :, 0]  # (B, K, p)
        c = token_statistics_step(w, self.temp, self.denom_bias, state)  # (B, K, p)
        return self.out_proj(merge_heads(c.unsqueeze(2).to(x.dtype)))

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"denom_bias"}


class ToSTLM(CausalLM):
    """ToST language model: the GPT-2 skeleton with causal TSSA as the token mixer."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, mixer=CausalTSSA)

    def init_states(self, batch: int) -> list[TSSAState]:
        device = self.wte.weight.device
        return [block.attn.init_state(batch, device) for block in self.blocks]

    def step(self, tokens: Tensor, states: list[TSSAState]) -> Tensor:
        """Next-token logits (B, V) after `tokens` (B,), at position states[0].t, in O(D) per
        layer: no earlier token is looked at again."""
        t = states[0].t
        if t >= self.seq_len:
            raise ValueError(f"position {t} is past model.seq_len={self.seq_len} (the position table)")
        x = self.wte(tokens)[:, None] + self.wpe.weight[t]  # (B, 1, D)
        for block, state in zip(self.blocks, states, strict=True):
            x = block(x, state)
        return self.lm_head(self.ln_f(x))[:, 0]

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """prompt (B, T0) followed by `max_new_tokens` sampled tokens (B, T0 + new). The prompt
        is read token by token into the recurrent state; temperature 0 takes the most likely token."""
        states = self.init_states(len(prompt))
        for t in range(prompt.shape[1]):
            logits = self.step(prompt[:, t], states)
        out = [prompt]
        for _ in range(max_new_tokens):
            if temperature == 0:
                token = logits.argmax(-1)
            else:
                logits = logits.float() / temperature
                if top_k is not None:
                    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                token = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
            out.append(token[:, None])
            logits = self.step(token, states)
        return torch.cat(out, dim=1)
