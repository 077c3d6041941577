"""Token Statistics Self-Attention's math, in both forms: parallel over a sequence and recurrent
over one token at a time (docs/models.md, sections 2-4).

This module is the one source of the TSSA formulas. It imports nothing but torch and the standard
library, so that `tools/convert.py export-hf` copies it verbatim beside the Hugging Face modeling
code of an exported ToST model, where it runs without this package (tests/test_convert.py checks
that the copy is this file, byte for byte).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

ENERGY_EPS = 1e-12  # floor of a coordinate's total energy (a coordinate no token has used yet)
MEMBERSHIP_EPS = 1e-8  # added to the total membership, which is 0 before any token


def token_statistics(
    w: Tensor, temp: Tensor, *, causal: bool, denom_bias: Tensor | None = None, eps: float = ENERGY_EPS
) -> tuple[Tensor, Tensor]:
    """TSSA core on projected tokens w (B, K, N, p); returns (c (B, K, N, p), pi (B, K, N)).

    temp (K, 1) is each head's inverse temperature; denom_bias (K, >= N), if given, is a learned
    per-position prior on the logits. Statistics are sums over all tokens, or prefix sums when
    causal. pi is returned too because white-box measurements (membership entropy) need it.
    Squares, sums and the softmax run in fp32 at least (bf16 prefix sums over T would drift);
    c comes back in w's dtype.
    """
    total = partial(torch.cumsum, dim=2) if causal else partial(torch.sum, dim=2, keepdim=True)
    N, p = w.shape[2:]
    dtype = w.dtype
    w = w.to(torch.promote_types(dtype, torch.float32))
    w2 = w.square()
    energy = w2 / total(w2).clamp_min(eps)  # (B, K, N, p): share of each coordinate's energy
    logits = energy.sum(dim=-1)  # (B, K, N)
    if denom_bias is not None:
        logits = logits + p * denom_bias[:, :N].to(w.dtype)
    pi = (temp.to(w.dtype) * logits).softmax(dim=1)  # (B, K, N): over HEADS, sums to 1 per token
    m = total(pi.unsqueeze(-1) * w2) / (total(pi).unsqueeze(-1) + MEMBERSHIP_EPS)  # (B, K, N or 1, p)
    c = -pi.unsqueeze(-1) * w / (1 + m)
    return c.to(dtype), pi


@dataclass
class TSSAState:
    """All that causal TSSA needs of the past to process the next token, per head: the prefix
    sums S = sum w^2 (p floats), M = sum pi w^2 (p floats) and P = sum pi (1 float), and the
    next position t. O(D) per layer, whatever t is."""

    S: Tensor  # (B, K, p)
    M: Tensor  # (B, K, p)
    P: Tensor  # (B, K)
    t: int = 0


def prefix_state(w: Tensor, pi: Tensor) -> TSSAState:
    """The state after reading a whole prefix at once: w (B, K, T, p) and the memberships pi
    (B, K, T) that `token_statistics(w, causal=True)` gave for it."""
    w2 = w.float().square()
    pi = pi.float()
    return TSSAState(w2.sum(2), (pi.unsqueeze(-1) * w2).sum(2), pi.sum(2), w.shape[2])


def token_statistics_step(w: Tensor, temp: Tensor, denom_bias: Tensor, state: TSSAState) -> Tensor:
    """Causal TSSA's recurrent form: the next token's w (B, K, p) -> its c (B, K, p) in fp32,
    updating `state` in place; equal to `token_statistics(causal=True)` at position state.t, to
    rounding. denom_bias is (K, >= state.t + 1)."""
    w = w.float()
    w2 = w.square()
    state.S += w2
    energy = (w2 / state.S.clamp_min(ENERGY_EPS)).sum(-1)  # (B, K)
    logits = energy + w.shape[-1] * denom_bias[:, state.t].float()
    pi = (temp.float().squeeze(-1) * logits).softmax(dim=1)  # (B, K): over heads
    state.M += pi.unsqueeze(-1) * w2
    state.P += pi
    state.t += 1
    return -pi.unsqueeze(-1) * w / (1 + state.M / (state.P.unsqueeze(-1) + MEMBERSHIP_EPS))
