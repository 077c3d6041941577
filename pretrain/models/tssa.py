"""Token Statistics Self-Attention's math, in both forms: parallel over a sequence and recurrent
over one token at a time (docs/models.md, sections 2-4), and both restarted at each document
boundary inside a block when given the tokens' document ids (docs/models.md, "Document masking").

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


def document_positions(document_ids: Tensor) -> Tensor:
    """Each token's position within its document, (B, T), from document_ids (B, T) (non-decreasing
    along T): t minus the position of its document's first token."""
    t = torch.arange(document_ids.shape[1], device=document_ids.device)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return t - torch.where(starts, t, 0).cummax(dim=1).values


def positional_prior(denom_bias: Tensor, N: int, positions: Tensor | None = None) -> Tensor:
    """denom_bias (K, >= N) at each token's position: (K, N), or (B, K, N) at positions (B, N)
    within documents, so that a document inside a block gets the prior of a block's start."""
    return denom_bias[:, :N] if positions is None else denom_bias[:, positions].transpose(0, 1)


def document_cumsum(x: Tensor, document_ids: Tensor) -> Tensor:
    """Prefix sums of x (B, K, T, ...) along tokens that restart at each document: at token t, the
    sum over the tokens s <= t of t's document; document_ids (B, T) is non-decreasing along T.

    A log-step scan: after the step of offset d, each token holds the sum over the 2d tokens up to
    it that share its document. Another document's tokens add exact zeros, so no bit of one
    document reaches another, as a cumsum minus its value at the document's start would.
    """
    T = x.shape[2]
    ids = document_ids.view(document_ids.shape[0], 1, T, *[1] * (x.ndim - 3))
    d = 1
    while d < T:
        same_document = ids[:, :, d:] == ids[:, :, :-d]
        x = torch.cat([x[:, :, :d], x[:, :, d:] + x[:, :, :-d].where(same_document, 0)], dim=2)
        d *= 2
    return x


def token_statistics(
    w: Tensor,
    temp: Tensor,
    *,
    causal: bool,
    denom_bias: Tensor | None = None,
    eps: float = ENERGY_EPS,
    document_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """TSSA core on projected tokens w (B, K, N, p); returns (c (B, K, N, p), pi (B, K, N)).

    temp (K, 1) is each head's inverse temperature; denom_bias (K, >= N), if given, is a learned
    per-position prior on the logits. Statistics are sums over all tokens, or prefix sums when
    causal. pi is returned too because white-box measurements (membership entropy) need it.
    Squares, sums and the softmax run in fp32 at least (bf16 prefix sums over T would drift);
    c comes back in w's dtype. With document_ids (B, N) (causal only), the prefix sums restart at
    each document and denom_bias is read at the position within the document: each document is
    processed as if it started the block.
    """
    N, p = w.shape[2:]
    positions = None
    if document_ids is None:
        total = partial(torch.cumsum, dim=2) if causal else partial(torch.sum, dim=2, keepdim=True)
    elif causal:
        total = partial(document_cumsum, document_ids=document_ids)
        positions = document_positions(document_ids)
    else:
        raise ValueError("document_ids need causal TSSA: non-causal statistics have no document masking")
    dtype = w.dtype
    w = w.to(torch.promote_types(dtype, torch.float32))
    w2 = w.square()
    energy = w2 / total(w2).clamp_min(eps)  # (B, K, N, p): share of each coordinate's energy
    logits = energy.sum(dim=-1)  # (B, K, N)
    if denom_bias is not None:
        logits = logits + p * positional_prior(denom_bias, N, positions).to(w.dtype)
    pi = (temp.to(w.dtype) * logits).softmax(dim=1)  # (B, K, N): over HEADS, sums to 1 per token
    m = total(pi.unsqueeze(-1) * w2) / (total(pi).unsqueeze(-1) + MEMBERSHIP_EPS)  # (B, K, N or 1, p)
    c = -pi.unsqueeze(-1) * w / (1 + m)
    return c.to(dtype), pi


@dataclass
class TSSAState:
    """All that causal TSSA needs of the past to process the next token, per head: the prefix
    sums S = sum w^2 (p floats), M = sum pi w^2 (p floats) and P = sum pi (1 float), and the
    next position t. O(D) per layer, whatever t is. Once a row has begun a new document
    (`restart`), its sums are the current document's and `start` says where it began."""

    S: Tensor  # (B, K, p)
    M: Tensor  # (B, K, p)
    P: Tensor  # (B, K)
    t: int = 0
    start: Tensor | None = None  # (B,) int64: position of each row's current document; None: all 0

    def restart(self, rows: Tensor) -> None:
        """rows (B,) bool begin a new document at the next token (the last one ended with EOS):
        their sums restart from zero and their positional prior from position 0."""
        keep = (~rows).to(self.S.dtype)
        self.S *= keep[:, None, None]
        self.M *= keep[:, None, None]
        self.P *= keep[:, None]
        start = torch.zeros_like(rows, dtype=torch.int64) if self.start is None else self.start
        self.start = torch.where(rows, self.t, start)


def prefix_state(w: Tensor, pi: Tensor, document_ids: Tensor | None = None) -> TSSAState:
    """The state after reading a whole prefix at once: w (B, K, T, p) and the memberships pi
    (B, K, T) that `token_statistics(w, causal=True, document_ids=document_ids)` gave for it. With
    document_ids (B, T), the sums are those of each row's last document."""
    T = w.shape[2]
    w2 = w.float().square()
    pi = pi.float()
    start = None
    if document_ids is not None:
        last_document = (document_ids == document_ids[:, -1:]).unsqueeze(1)  # (B, 1, T)
        w2, pi = w2 * last_document.unsqueeze(-1), pi * last_document
        start = T - last_document.sum((1, 2))
    return TSSAState(w2.sum(2), (pi.unsqueeze(-1) * w2).sum(2), pi.sum(2), T, start)


def token_statistics_step(w: Tensor, temp: Tensor, denom_bias: Tensor, state: TSSAState) -> Tensor:
    """Causal TSSA's recurrent form: the next token's w (B, K, p) -> its c (B, K, p) in fp32,
    updating `state` in place; equal to `token_statistics(causal=True)` at position state.t, to
    rounding. denom_bias is (K, >= state.t + 1), read at the position within the document."""
    w = w.float()
    w2 = w.square()
    state.S += w2
    energy = (w2 / state.S.clamp_min(ENERGY_EPS)).sum(-1)  # (B, K)
    prior = denom_bias[:, state.t] if state.start is None else denom_bias[:, state.t - state.start].T
    logits = energy + w.shape[-1] * prior.float()
    pi = (temp.float().squeeze(-1) * logits).softmax(dim=1)  # (B, K): over heads
    state.M += pi.unsqueeze(-1) * w2
    state.P += pi
    state.t += 1
    return -pi.unsqueeze(-1) * w / (1 + state.M / (state.P.unsqueeze(-1) + MEMBERSHIP_EPS))
