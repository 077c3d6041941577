"""TSSA as one operator with a hand-written backward, computed in chunks along the sequence.

`token_statistics` in pretrain/models/tssa.py is the readable reference: a chain of full-length
ops, each writing a (B, K, T, p) tensor that autograd keeps. This module computes the same
function (docs/models.md, sections 2-3) chunk by chunk, so that no full-length temporary is
held: the prefix sums S, M, P cross chunk boundaries as carries. Backward keeps only the
projected tokens w, the memberships pi and logits (per token and head), and the statistics at
each chunk's start (T / chunk of them); it recomputes the rest, in one reverse sweep for the
causal form (suffix sums of the gradients as carries) and in three sweeps for the non-causal one.

The pair of passes is registered as torch custom ops (`whitebox::tssa`, `whitebox::tssa_backward`)
with fake implementations, so torch.compile, activation checkpointing, FSDP2 and DeepSpeed see
one opaque op with known output shapes.

Backward, per head, with r = 1 / (1 + m), Q = P + eps_M, m = M / Q, Sc = max(S, eps), g = dL/dc:
    dL/dm = g pi w r^2 = gm;  dL/dM = gm / Q;  dL/dQ = -sum_j gm m / Q
    dL/dpi = -sum_j g w r + sum_j R_M w^2 + R_Q    (R_X: the suffix sum of dL/dX, or its total)
    dL/dz = pi (dL/dpi - sum_heads pi dL/dpi);  z = temp * logits;  logits = sum_j w^2 / Sc + p b
    dL/dS = -dL/dlogits w^2 / Sc^2 (where S >= eps)
    dL/dw = -g pi r + 2 w (dL/dlogits / Sc + pi R_M + R_S)
"""

from __future__ import annotations

import torch
from torch import Tensor

from pretrain.models.tssa import ENERGY_EPS, MEMBERSHIP_EPS

# Tokens per chunk. A chunk's temporaries are a few (B, K, CHUNK, p) fp32 tensors: at D = 768
# one is 0.4 MiB, so a chunk's work stays in the CPU's caches, while the per-chunk overhead of
# launching some 40 small ops stays below a tenth of the arithmetic (tools/bench/attention.py).
CHUNK_TOKENS = 128


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _chunks(T: int, chunk: int) -> list[tuple[int, int]]:
    return [(a, min(a + chunk, T)) for a in range(0, T, chunk)]


def _inclusive(x: Tensor, carry: Tensor) -> Tensor:
    """carry + the prefix sums of x (B, K, L, ...) along L."""
    return torch.cumsum(x, dim=2).add_(carry)


def _suffix(x: Tensor, carry: Tensor) -> Tensor:
    """carry + the suffix sums of x along L (sum over positions >= each one)."""
    return torch.cumsum(x.flip(2), dim=2).flip(2).add_(carry)


def _logits(w2: Tensor, Sc: Tensor, bias: Tensor | None) -> Tensor:
    """Each token's share of its head's energy, summed over coordinates, plus the prior: (B, K, L)."""
    logits = (w2 / Sc).sum(-1)
    return logits if bias is None else logits.add_(bias)


def _position_prior(denom_bias: Tensor | None, a: int, b: int, p: int, dtype: torch.dtype) -> Tensor | None:
    return None if denom_bias is None else p * denom_bias[:, a:b].to(dtype)


def tssa_forward(
    w: Tensor, temp: Tensor, denom_bias: Tensor | None, causal: bool, eps: float, chunk: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(c, pi, logits, S0, M0, P0): the output, the per-token scalars, and the statistics at each
    chunk's start (causal) or their totals (non-causal, one 'chunk')."""
    B, K, T, p = w.shape
    f32 = _stats_dtype(w.dtype)
    temp = temp.to(f32)  # (K, 1)
    c = torch.empty(B, K, T, p, dtype=w.dtype, device=w.device)
    pi = torch.empty(B, K, T, dtype=f32, device=w.device)
    logits = torch.empty(B, K, T, dtype=f32, device=w.device)
    spans = _chunks(T, chunk)
    S = w.new_zeros(B, K, 1, p, dtype=f32)
    M = w.new_zeros(B, K, 1, p, dtype=f32)
    P = w.new_zeros(B, K, 1, dtype=f32)
    if causal:
        S0, M0, P0 = (w.new_empty(len(spans), *x.shape[:2], *x.shape[3:], dtype=f32) for x in (S, M, P))
        for i, (a, b) in enumerate(spans):
            S0[i], M0[i], P0[i] = S[:, :, 0], M[:, :, 0], P[:, :, 0]
            wc = w[:, :, a:b].to(f32)
            w2 = wc * wc
            S_ = _inclusive(w2, S)
            lg = _logits(w2, S_.clamp_min(eps), _position_prior(denom_bias, a, b, p, f32))
            pc = (temp * lg).softmax(dim=1)
            M_ = _inclusive(pc.unsqueeze(-1) * w2, M)
            Q = _inclusive(pc, P).add_(MEMBERSHIP_EPS)
            c[:, :, a:b] = (pc.unsqueeze(-1) * wc).div_((M_ / Q.unsqueeze(-1)).add_(1)).neg_()
            logits[:, :, a:b], pi[:, :, a:b] = lg, pc
            S, M, P = S_[:, :, -1:], M_[:, :, -1:], Q[:, :, -1:] - MEMBERSHIP_EPS
        return c, pi, logits, S0, M0, P0
    for a, b in spans:
        wc = w[:, :, a:b].to(f32)
        S += (wc * wc).sum(2, keepdim=True)
    Sc = S.clamp_min(eps)
    for a, b in spans:
        wc = w[:, :, a:b].to(f32)
        w2 = wc * wc
        lg = _logits(w2, Sc, _position_prior(denom_bias, a, b, p, f32))
        pc = (temp * lg).softmax(dim=1)
        M += (pc.unsqueeze(-1) * w2).sum(2, keepdim=True)
        P += pc.sum(2, keepdim=True)
        logits[:, :, a:b], pi[:, :, a:b] = lg, pc
    r = 1 / (M / (P.unsqueeze(-1) + MEMBERSHIP_EPS) + 1)  # (B, K, 1, p)
    for a, b in spans:
        c[:, :, a:b] = pi[:, :, a:b].unsqueeze(-1) * w[:, :, a:b].to(f32) * -r
    return c, pi, logits, S[None, :, :, 0], M[None, :, :, 0], P[None, :, :, 0]


def _membership_grad(gpi: Tensor, pi: Tensor, logits: Tensor, temp: Tensor) -> tuple[Tensor, Tensor]:
    """Through pi = softmax_heads(temp * logits): (dL/dlogits, dL/dtemp's per-head sum (K, 1))."""
    gz = pi * (gpi - (pi * gpi).sum(1, keepdim=True))
    return gz * temp, (gz * logits).sum((0, 2)).unsqueeze(-1)


def tssa_backward(
    grad_c: Tensor,
    grad_pi: Tensor | None,
    w: Tensor,
    temp: Tensor,
    denom_bias: Tensor | None,
    pi: Tensor,
    logits: Tensor,
    S0: Tensor,
    M0: Tensor,
    P0: Tensor,
    causal: bool,
    eps: float,
    chunk: int,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(dw, dtemp, ddenom_bias) from the forward's saved tensors; see the module docstring."""
    B, K, T, p = w.shape
    f32 = _stats_dtype(w.dtype)
    temp32 = temp.to(f32)
    dw = torch.empty_like(w)
    dtemp = torch.zeros_like(temp32)
    dlogits = torch.empty_like(logits)
    spans = _chunks(T, chunk)

    def grads_through_m(g: Tensor, pc: Tensor, wc: Tensor, M_: Tensor, Q: Tensor) -> tuple[Tensor, ...]:
        """(-pi r, dL/dM, dL/dQ, direct dL/dpi) of a chunk, from m = M / Q and c = -pi w / (1 + m)."""
        m = M_ / Q.unsqueeze(-1)
        r = 1 / (m + 1)
        gr = g * r  # g r
        gm = gr * r * wc * pc.unsqueeze(-1)
        dM = gm / Q.unsqueeze(-1)
        dQ = -(gm * m).sum(-1) / Q
        gpi = -(gr * wc).sum(-1)
        return -pc.unsqueeze(-1) * r, dM, dQ, gpi

    if causal:
        RM = w.new_zeros(B, K, 1, p, dtype=f32)
        RQ = w.new_zeros(B, K, 1, dtype=f32)
        RS = w.new_zeros(B, K, 1, p, dtype=f32)
        for i, (a, b) in reversed(list(enumerate(spans))):
            wc = w[:, :, a:b].to(f32)
            g = grad_c[:, :, a:b].to(f32)
            pc, lg = pi[:, :, a:b], logits[:, :, a:b]
            w2 = wc * wc
            S_ = _inclusive(w2, S0[i].unsqueeze(2))
            M_ = _inclusive(pc.unsqueeze(-1) * w2, M0[i].unsqueeze(2))
            Q = _inclusive(pc, P0[i].unsqueeze(-1)).add_(MEMBERSHIP_EPS)
            direct, dM, dQ, gpi = grads_through_m(g, pc, wc, M_, Q)
            RM_ = _suffix(dM, RM)
            RQ_ = _suffix(dQ, RQ)
            gpi += (RM_ * w2).sum(-1) + RQ_
            if grad_pi is not None:
                gpi += grad_pi[:, :, a:b]
            dlg, dt = _membership_grad(gpi, pc, lg, temp32)
            dtemp += dt
            dlogits[:, :, a:b] = dlg
            Sc = S_.clamp_min(eps)
            inv = dlg.unsqueeze(-1) / Sc
            dS = (inv * w2 / Sc).neg_().mul_(S_ >= eps)
            RS_ = _suffix(dS, RS)
            dw[:, :, a:b] = g * direct + 2 * wc * (inv + pc.unsqueeze(-1) * RM_ + RS_)
            RM, RQ, RS = RM_[:, :, :1], RQ_[:, :, :1], RS_[:, :, :1]
    else:
        S, M, P = S0[0].unsqueeze(2), M0[0].unsqueeze(2), P0[0].unsqueeze(-1)
        Q = P + MEMBERSHIP_EPS
        RM = torch.zeros_like(M)
        RQ = torch.zeros_like(Q)
        gpi = torch.empty_like(pi)
        for a, b in spans:
            wc = w[:, :, a:b].to(f32)
            g = grad_c[:, :, a:b].to(f32)
            _, dM, dQ, gpi[:, :, a:b] = grads_through_m(g, pi[:, :, a:b], wc, M, Q)
            RM += dM.sum(2, keepdim=True)
            RQ += dQ.sum(2, keepdim=True)
        Sc = S.clamp_min(eps)
        RS = torch.zeros_like(S)
        for a, b in spans:
            wc = w[:, :, a:b].to(f32)
            w2 = wc * wc
            gpi_c = gpi[:, :, a:b] + (RM * w2).sum(-1) + RQ
            if grad_pi is not None:
                gpi_c += grad_pi[:, :, a:b]
            dlg, dt = _membership_grad(gpi_c, pi[:, :, a:b], logits[:, :, a:b], temp32)
            dtemp += dt
            dlogits[:, :, a:b] = dlg
            RS -= (dlg.unsqueeze(-1) * w2).sum(2, keepdim=True)
        RS = RS / (Sc * Sc) * (S >= eps)
        for a, b in spans:
            wc = w[:, :, a:b].to(f32)
            g = grad_c[:, :, a:b].to(f32)
            pc = pi[:, :, a:b]
            direct, *_ = grads_through_m(g, pc, wc, M, Q)
            inv = dlogits[:, :, a:b].unsqueeze(-1) / Sc
            dw[:, :, a:b] = g * direct + 2 * wc * (inv + pc.unsqueeze(-1) * RM + RS)
    ddenom_bias = None
    if denom_bias is not None:
        ddenom_bias = torch.zeros_like(denom_bias)
        ddenom_bias[:, :T] = p * dlogits.sum(0)
    return dw, dtemp.to(temp.dtype), ddenom_bias
