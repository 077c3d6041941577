"""TSSA as one operator with a hand-written backward, computed in chunks along the sequence.

`token_statistics` in pretrain/models/tssa.py is the readable reference: a chain of full-length
ops, each writing a (B, K, T, p) tensor that autograd keeps. This module computes the same
function (docs/models.md, sections 2-3) chunk by chunk, so that no full-length temporary is
held: the prefix sums S, M, P cross chunk boundaries as carries. A causal chunk is held
coordinate-major, (B, K, p, L), because torch's cumsum along a contiguous last dimension is about
4x faster on CPU than along a strided one, and c is written in that layout too; non-causal
chunks need no scans and stay token-major views of w. Either way merge_heads(c) is a view.
Backward keeps only the projected tokens w, the memberships pi and logits (per token and head),
and the statistics at each chunk's start (T / chunk of them); it recomputes the rest, in one
reverse sweep for the causal form (suffix sums of the gradients as carries) and in three sweeps
for the non-causal one.

The pair of passes is registered as torch custom ops (`whitebox::tssa`, `whitebox::tssa_backward`)
with fake implementations, so torch.compile, activation checkpointing, FSDP2 and DeepSpeed see
one opaque op with known output shapes.

With document ids (B, T) (causal only), the prefix sums restart at each document start: a chunk's
scan is a plain cumsum, overwritten in the rows where a document starts inside the chunk by the
cumsum of each such document's run (exact: no bit of an earlier document reaches it), and a
carry crosses into a chunk only in the rows whose document goes on; the backward's suffix sums
likewise. The prior denom_bias is read at each token's position within its document.

Backward, per head, with r = 1 / (1 + m), Q = P + eps_M, m = M / Q, Sc = max(S, eps), g = dL/dc:
    dL/dm = g pi w r^2 = gm;  dL/dM = gm / Q;  dL/dQ = -sum_j gm m / Q
    dL/dpi = -sum_j g w r + sum_j R_M w^2 + R_Q    (R_X: the suffix sum of dL/dX, or its total)
    dL/dz = pi (dL/dpi - sum_heads pi dL/dpi);  z = temp * logits;  logits = sum_j w^2 / Sc + p b
    dL/dS = -dL/dlogits w^2 / Sc^2 (where S >= eps)
    dL/dw = -g pi r + 2 w (dL/dlogits / Sc + pi R_M + R_S)
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from pretrain.models.tssa import ENERGY_EPS, MEMBERSHIP_EPS, document_positions, positional_prior

# Tokens per chunk. A chunk's temporaries are a dozen (B, K, p, CHUNK) fp32 tensors, 0.8 MiB each
# at D = 768, so its work stays in the CPU's caches; fewer, longer chunks pay less for launching
# some 60 small ops per chunk. Measured at 8,192 tokens on this project's 2-core CPU, forward +
# backward of the causal op: 167 ms with 64, 141 with 128, 123 with 256, 124 with 512, 136 with 1024.
CHUNK_TOKENS = 256


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _chunks(T: int, chunk: int) -> list[tuple[int, int]]:
    return [(a, min(a + chunk, T)) for a in range(0, T, chunk)]


def _coordinate_major(x: Tensor, a: int, b: int, dtype: torch.dtype) -> Tensor:
    """Tokens a:b of x (B, K, T, p) as (B, K, p, L) with contiguous rows, in `dtype`; a view of x
    when x is stored that way already (never written to)."""
    chunk = x[:, :, a:b].transpose(2, 3)
    if chunk.stride(-1) == 1 and chunk.dtype == dtype:
        return chunk
    return torch.empty(chunk.shape, dtype=dtype, device=x.device).copy_(chunk)


def _token_major(x: Tensor, a: int, b: int, dtype: torch.dtype) -> Tensor:
    """Tokens a:b of x (B, K, T, p), (B, K, L, p) in `dtype`: a view when x has that dtype."""
    return x[:, :, a:b].to(dtype)


def _coordinate_major_empty(like: Tensor, dtype: torch.dtype) -> Tensor:
    """An uninitialised (B, K, T, p) tensor stored as (B, K, p, T)."""
    B, K, T, p = like.shape
    return torch.empty(B, K, p, T, dtype=dtype, device=like.device).transpose(2, 3)


def _token_major_empty(like: Tensor, dtype: torch.dtype) -> Tensor:
    """An uninitialised (B, K, T, p) tensor stored as (B, T, K, p), as split_heads gives w."""
    B, K, T, p = like.shape
    return torch.empty(B, T, K, p, dtype=dtype, device=like.device).transpose(1, 2)


def _empty_like_output(like: Tensor, causal: bool) -> Tensor:
    """c's or dw's storage: coordinate-major for the causal scans, token-major otherwise."""
    return (_coordinate_major_empty if causal else _token_major_empty)(like, like.dtype)


@dataclass
class _ChunkDocuments:
    """Where the documents of a chunk of tokens begin and end, for its segmented scans."""

    continues: Tensor  # (B,) 1.0 where the chunk's first token is in the document of the token before it
    continued: Tensor  # (B,) 1.0 where the token after the chunk is in the document of the chunk's last token
    runs: list[tuple[int, int, int]]  # (row, s, e), chunk-local, of each document in rows where one starts inside


def _chunk_documents(document_ids: Tensor | None, T: int, chunk: int) -> list[_ChunkDocuments | None]:
    """Per chunk of `chunk` tokens, its documents (or None for each chunk, without document ids); one host sync."""
    spans = _chunks(T, chunk)
    if document_ids is None:
        return [None] * len(spans)
    B = document_ids.shape[0]
    goes_on = (document_ids[:, 1:] == document_ids[:, :-1]).to(torch.float32)  # (B, T - 1): t + 1 in t's document
    starts: dict[tuple[int, int], list[int]] = {}  # (chunk, row) -> document starts inside the chunk
    for row, t in (goes_on == 0).nonzero().tolist():
        if (t + 1) % chunk != 0:
            starts.setdefault(((t + 1) // chunk, row), []).append(t + 1)
    documents = []
    for i, (a, b) in enumerate(spans):
        runs = []
        for row in range(B):
            if (i, row) in starts:
                runs += [(row, s - a, e - a) for s, e in pairwise([a, *starts[i, row], b])]
        continues = goes_on[:, a - 1] if a > 0 else goes_on.new_zeros(B)
        continued = goes_on[:, b - 1] if b < T else goes_on.new_zeros(B)
        documents.append(_ChunkDocuments(continues, continued, runs))
    return documents


def _carried(carry: Tensor, goes_on: Tensor) -> Tensor:
    """The carry (B, ...) into a chunk, zero in the rows where the document does not go on."""
    return carry * goes_on.view(-1, *[1] * (carry.dim() - 1))


def _prefix(x: Tensor, carry: Tensor, documents: _ChunkDocuments | None) -> Tensor:
    """carry + the prefix sums of x along its last dimension, both restarting at each document start."""
    if documents is None:
        return torch.cumsum(x, -1).add_(carry)
    out = torch.cumsum(x, -1).add_(_carried(carry, documents.continues))
    for row, s, e in documents.runs:
        if s > 0:
            out[row, ..., s:e] = torch.cumsum(x[row, ..., s:e], -1)
    return out


def _suffix_sums(x: Tensor) -> Tensor:
    """The suffix sums of x along its last dimension (sum over positions >= each one). Flipped,
    not total - prefix + x: that loses a small suffix beside a large prefix."""
    return torch.cumsum(x.flip(-1), dim=-1).flip(-1)


def _suffix(x: Tensor, carry: Tensor, documents: _ChunkDocuments | None) -> Tensor:
    """carry + the suffix sums of x along its last dimension, both stopping at each document end."""
    if documents is None:
        return _suffix_sums(x).add_(carry)
    out = _suffix_sums(x).add_(_carried(carry, documents.continued))
    for row, s, e in documents.runs:
        if e < x.shape[-1]:
            out[row, ..., s:e] = _suffix_sums(x[row, ..., s:e])
    return out


def _with_prior(logits: Tensor, prior: Tensor | None, a: int, b: int, p: int) -> Tensor:
    """Adds the learned positional prior p * prior[..., a:b] ((K, T) or (B, K, T)) to logits (B, K, L) in place."""
    return logits if prior is None else logits.add_(prior[..., a:b].to(logits.dtype), alpha=p)


def _prior(denom_bias: Tensor | None, T: int, document_ids: Tensor | None) -> Tensor | None:
    """denom_bias at each token's position (within its document, given document ids)."""
    if denom_bias is None:
        return None
    return positional_prior(denom_bias, T, None if document_ids is None else document_positions(document_ids))


def prior_grad(dlogits: Tensor, p: int, shape: torch.Size, dtype: torch.dtype, document_ids: Tensor | None) -> Tensor:
    """dL/ddenom_bias (shape, dtype) from dL/dlogits (B, K, T): each logit holds p * denom_bias at
    its position (within its document, given document ids). Shared with the Triton kernels' backward."""
    B, K, T = dlogits.shape
    grad = torch.zeros(shape, dtype=dtype, device=dlogits.device)
    if document_ids is None:
        grad[:, :T] = p * dlogits.sum(0)
    else:
        positions = document_positions(document_ids).flatten()  # (B * T,)
        grad.index_add_(1, positions, (p * dlogits).transpose(0, 1).reshape(K, B * T).to(dtype))
    return grad


def _below(S: Tensor, eps: float, documents: _ChunkDocuments | None) -> Tensor | None:
    """Where S (B, K, p, L) < eps, so that the clamp passes no gradient, or None in the usual case
    of nowhere. S never decreases along a document's tokens, so the first token of each tells."""
    first = S if documents is not None else S[..., 0]
    return (S < eps) if bool((first.amin() < eps).item()) else None


def _shrink_into(wc: Tensor, inv_QM: Tensor, pcQ: Tensor, coord: int, out: Tensor) -> None:
    """c = -pi w / (1 + M / Q) = w (-pi Q) / (Q + M), into out; inv_QM = 1 / (Q + M). The one
    formula for c, in forward and in backward's recomputation, so that both give the same bits."""
    torch.mul(wc * inv_QM, -pcQ.unsqueeze(coord), out=out)


def tssa_forward(
    w: Tensor,
    temp: Tensor,
    denom_bias: Tensor | None,
    causal: bool,
    eps: float,
    chunk: int,
    document_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(c, pi, logits, S0, M0, P0): the output, the per-token scalars, and the statistics at each
    chunk's start (causal: (n_chunks, B, K, p) and (n_chunks, B, K)) or their totals (non-causal:
    one 'chunk'). A chunk's start statistics are those of the document of the token before it."""
    B, K, T, p = w.shape
    prior = _prior(denom_bias, T, document_ids)
    f32 = _stats_dtype(w.dtype)
    temp = temp.to(f32)  # (K, 1)
    c = _empty_like_output(w, causal)
    pi = w.new_empty(B, K, T, dtype=f32)
    logits = w.new_empty(B, K, T, dtype=f32)
    spans = _chunks(T, chunk)
    S = w.new_zeros(B, K, p, 1, dtype=f32)
    M = w.new_zeros(B, K, p, 1, dtype=f32)
    P = w.new_zeros(B, K, 1, dtype=f32)
    if causal:
        S0 = w.new_empty(len(spans), B, K, p, dtype=f32)
        M0, P0 = torch.empty_like(S0), w.new_empty(len(spans), B, K, dtype=f32)
        for i, ((a, b), documents) in enumerate(zip(spans, _chunk_documents(document_ids, T, chunk), strict=True)):
            S0[i], M0[i], P0[i] = S[..., 0], M[..., 0], P[..., 0]
            wc = _coordinate_major(w, a, b, f32)  # (B, K, p, L)
            w2 = wc * wc
            S_ = _prefix(w2, S, documents)
            S = S_[..., -1:].clone()
            lg = _with_prior((w2 / S_.clamp_min_(eps)).sum(-2), prior, a, b, p)  # (B, K, L)
            pc = torch.softmax(temp * lg, dim=1)  # over heads
            M_ = _prefix(w2.mul_(pc.unsqueeze(-2)), M, documents)
            M = M_[..., -1:].clone()
            P_ = _prefix(pc, P, documents)
            P = P_[..., -1:].clone()
            Q = P_.add_(MEMBERSHIP_EPS)  # (B, K, L)
            inv_QM = M_.add_(Q.unsqueeze(-2)).reciprocal_()
            _shrink_into(wc, inv_QM, pc * Q, -2, c.transpose(2, 3)[..., a:b])
            logits[:, :, a:b], pi[:, :, a:b] = lg, pc
        return c, pi, logits, S0, M0, P0
    # Non-causal: totals, no scans, so chunks stay token-major (B, K, L, p), views of w.
    S, M = S.transpose(2, 3), M.transpose(2, 3)  # (B, K, 1, p)
    for a, b in spans:
        S += _token_major(w, a, b, f32).square().sum(2, keepdim=True)
    Sc = S.clamp_min(eps)
    for a, b in spans:
        w2 = _token_major(w, a, b, f32).square()
        lg = _with_prior((w2 / Sc).sum(-1), prior, a, b, p)
        pc = torch.softmax(temp * lg, dim=1)
        M += w2.mul_(pc.unsqueeze(-1)).sum(2, keepdim=True)
        P += pc.sum(-1, keepdim=True)
        logits[:, :, a:b], pi[:, :, a:b] = lg, pc
    Q = P + MEMBERSHIP_EPS  # (B, K, 1)
    inv_QM = 1 / (M + Q.unsqueeze(-1))  # (B, K, 1, p)
    for a, b in spans:
        _shrink_into(_token_major(w, a, b, f32), inv_QM, pi[:, :, a:b] * Q, -1, c[:, :, a:b])
    return c, pi, logits, S[:, :, 0][None], M[:, :, 0][None], P[..., 0][None]


def _through_m(
    g: Tensor, wc: Tensor, inv_QM: Tensor, Q: Tensor, pc: Tensor, coord: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A chunk's gradients through c = -pi w / (1 + M / Q): (g / (Q + M), the direct dL/dpi,
    dL/dM, dL/dQ). g, wc: (B, K, p, L) or (B, K, L, p), `coord` the coordinates' dimension; Q and
    pc (B, K, L) (Q: or (B, K, 1))."""
    gA = g * inv_QM
    gwA = gA * wc
    s1 = gwA.sum(coord)  # sum_j g w / (Q + M)
    dM = gwA.mul_(inv_QM)
    s2 = dM.sum(coord)  # sum_j g w / (Q + M)^2
    dM.mul_((pc * Q).unsqueeze(coord))  # g pi w Q / (Q + M)^2
    return gA, -Q * s1, dM, pc * (Q * s2 - s1)


def membership_grad(gpi: Tensor, pi: Tensor, logits: Tensor, temp: Tensor) -> tuple[Tensor, Tensor]:
    """Through pi = softmax_heads(temp * logits), (B, K, L) each, temp (K, 1): (dL/dlogits,
    dL/dtemp (K, 1)). Shared with the Triton kernels' backward, which runs it between kernels."""
    gz = pi * (gpi - (pi * gpi).sum(1, keepdim=True))
    return gz * temp, (gz * logits).sum((0, 2)).unsqueeze(-1)


def _input_grad(gA: Tensor, pcQ: Tensor, shrink: Tensor, wc: Tensor, out: Tensor, coord: int) -> None:
    """dL/dw = -g pi Q / (Q + M) + 2 w * shrink, into out; shrink = dL/d(w^2) by every other path."""
    torch.addcmul(gA.mul_(-pcQ.unsqueeze(coord)), shrink, wc, value=2, out=out)


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
    c_out: Tensor | None = None,
    document_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(dw, dtemp, ddenom_bias) from the forward's saved tensors; see the module docstring. With
    `c_out` (laid out as forward lays out c), the output c is recomputed into it on the way."""
    B, K, T, p = w.shape
    f32 = _stats_dtype(w.dtype)
    temp32 = temp.to(f32)
    dw = _empty_like_output(w, causal)
    dtemp = torch.zeros_like(temp32)
    dlogits = torch.empty_like(logits)
    spans = _chunks(T, chunk)
    if causal:
        RM = w.new_zeros(B, K, p, 1, dtype=f32)  # suffix sums of dL/dM, dL/dQ and -dL/dS past the chunk
        RQ = w.new_zeros(B, K, 1, dtype=f32)
        RS = w.new_zeros(B, K, p, 1, dtype=f32)
        chunk_documents = _chunk_documents(document_ids, T, chunk)
        for i, (a, b) in reversed(list(enumerate(spans))):
            documents = chunk_documents[i]
            wc = _coordinate_major(w, a, b, f32)
            g = _coordinate_major(grad_c, a, b, f32)
            pc, lg = pi[:, :, a:b], logits[:, :, a:b]
            w2 = wc * wc
            S_ = _prefix(w2, S0[i].unsqueeze(-1), documents)
            M_ = _prefix(w2 * pc.unsqueeze(-2), M0[i].unsqueeze(-1), documents)
            Q = _prefix(pc, P0[i].unsqueeze(-1), documents).add_(MEMBERSHIP_EPS)  # (B, K, L)
            inv_QM = M_.add_(Q.unsqueeze(-2)).reciprocal_()
            gA, gpi, dM, dQ = _through_m(g, wc, inv_QM, Q, pc, coord=-2)
            RM_ = _suffix(dM, RM, documents)
            RQ_ = _suffix(dQ, RQ, documents)
            gpi += (RM_ * w2).sum(-2) + RQ_
            if grad_pi is not None:
                gpi += grad_pi[:, :, a:b]
            dlg, dt = membership_grad(gpi, pc, lg, temp32)
            dtemp += dt
            dlogits[:, :, a:b] = dlg
            below = _below(S_, eps, documents)
            inv_S = S_.clamp_min_(eps).reciprocal_()
            d_energy = inv_S * dlg.unsqueeze(-2)  # dL/dlogits / Sc
            dS = d_energy * w2 * inv_S  # -dL/dS
            if below is not None:
                dS.masked_fill_(below, 0)
            RS_ = _suffix(dS, RS, documents)
            RM, RQ, RS = RM_[..., :1].clone(), RQ_[..., :1].clone(), RS_[..., :1].clone()
            shrink = RM_.mul_(pc.unsqueeze(-2)).add_(d_energy).sub_(RS_)
            _input_grad(gA, pc * Q, shrink, wc, dw.transpose(2, 3)[..., a:b], coord=-2)
            if c_out is not None:
                _shrink_into(wc, inv_QM, pc * Q, -2, c_out.transpose(2, 3)[..., a:b])
    else:  # token-major chunks, (B, K, L, p); the statistics are totals (B, K, 1, p)
        S, M, P = S0[0].unsqueeze(2), M0[0].unsqueeze(2), P0[0].unsqueeze(-1)
        Q = P + MEMBERSHIP_EPS  # (B, K, 1)
        inv_QM = 1 / (M + Q.unsqueeze(-1))
        RM = torch.zeros_like(M)
        RQ = torch.zeros_like(Q)
        gpi = torch.empty_like(pi)
        for a, b in spans:
            g = _token_major(grad_c, a, b, f32)
            _, gpi[:, :, a:b], dM, dQ = _through_m(g, _token_major(w, a, b, f32), inv_QM, Q, pi[:, :, a:b], coord=-1)
            RM += dM.sum(2, keepdim=True)
            RQ += dQ.sum(-1, keepdim=True)
        if grad_pi is not None:
            gpi += grad_pi
        inv_S = S.clamp_min(eps).reciprocal_()
        RS = torch.zeros_like(S)  # -dL/dS summed over tokens
        for a, b in spans:
            w2 = _token_major(w, a, b, f32).square()
            gpi_c = gpi[:, :, a:b] + (RM * w2).sum(-1) + RQ
            dlg, dt = membership_grad(gpi_c, pi[:, :, a:b], logits[:, :, a:b], temp32)
            dtemp += dt
            dlogits[:, :, a:b] = dlg
            RS += (w2 * dlg.unsqueeze(-1)).sum(2, keepdim=True)
        RS *= inv_S * inv_S
        below = _below(S.transpose(2, 3), eps, None)
        if below is not None:
            RS.masked_fill_(below.transpose(2, 3), 0)
        for a, b in spans:
            wc = _token_major(w, a, b, f32)
            pc = pi[:, :, a:b]
            shrink = (inv_S * dlogits[:, :, a:b].unsqueeze(-1)).addcmul_(RM, pc.unsqueeze(-1)).sub_(RS)
            gA = _token_major(grad_c, a, b, f32) * inv_QM
            _input_grad(gA, pc * Q, shrink, wc, dw[:, :, a:b], coord=-1)
            if c_out is not None:
                _shrink_into(wc, inv_QM, pc * Q, -1, c_out[:, :, a:b])
    ddenom_bias = None
    if denom_bias is not None:
        ddenom_bias = prior_grad(dlogits, p, denom_bias.shape, denom_bias.dtype, document_ids)
    return dw, dtemp.to(temp.dtype), ddenom_bias


# ----------------------------------------------------------------------------------------------
# The operator: forward and backward as torch custom ops, joined by autograd. With an output
# projection (`weight`, `bias`: the layer's out_proj), the operator returns y = out_proj(c) and
# keeps w instead of c: backward recomputes c (two more elementwise passes per chunk) for
# out_proj's weight gradient, so a TSSA layer stores one (B, T, D) activation fewer.


def _merged(c: Tensor) -> Tensor:
    """merge_heads(c): (B, T, D), a view for c stored coordinate- or token-major."""
    B, K, T, p = c.shape
    return c.transpose(1, 2).reshape(B, T, K * p)


def _project(c: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """out_proj(merge_heads(c)): (B, T, D)."""
    y = torch.matmul(_merged(c), weight.t())
    return y if bias is None else y.add_(bias)


def _forward(
    w: Tensor,
    temp: Tensor,
    denom_bias: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    causal: bool,
    eps: float,
    chunk: int,
    document_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    c, *rest = tssa_forward(w, temp, denom_bias, causal, eps, chunk, document_ids)
    return (c if weight is None else _project(c, weight, bias), *rest)


def _output_like(w: Tensor, weight: Tensor | None, causal: bool) -> Tensor:
    B, K, T, p = w.shape
    return _empty_like_output(w, causal) if weight is None else w.new_empty(B, T, K * p)


@torch.library.custom_op("whitebox::tssa", mutates_args=())
def _tssa_op(
    w: Tensor,
    temp: Tensor,
    denom_bias: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    causal: bool,
    eps: float,
    chunk: int,
    document_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _forward(w, temp, denom_bias, weight, bias, causal, eps, chunk, document_ids)


@_tssa_op.register_fake
def _tssa_op_fake(
    w: Tensor,
    temp: Tensor,
    denom_bias: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    causal: bool,
    eps: float,
    chunk: int,
    document_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    B, K, T, p = w.shape
    f32 = _stats_dtype(w.dtype)
    n_chunks = (T + chunk - 1) // chunk if causal else 1
    return (
        _output_like(w, weight, causal),
        w.new_empty(B, K, T, dtype=f32),
        w.new_empty(B, K, T, dtype=f32),
        w.new_empty(n_chunks, B, K, p, dtype=f32),
        w.new_empty(n_chunks, B, K, p, dtype=f32),
        w.new_empty(n_chunks, B, K, dtype=f32),
    )


def _or_empty(grad: Tensor | None, like: Tensor) -> Tensor:
    """A custom op returns tensors, never None: an absent gradient travels as a new empty tensor."""
    return like.new_empty(0) if grad is None else grad


@torch.library.custom_op("whitebox::tssa_backward", mutates_args=())
def _tssa_backward_op(
    grad_out: Tensor,
    grad_pi: Tensor | None,
    w: Tensor,
    temp: Tensor,
    denom_bias: Tensor | None,
    weight: Tensor | None,
    pi: Tensor,
    logits: Tensor,
    S0: Tensor,
    M0: Tensor,
    P0: Tensor,
    causal: bool,
    eps: float,
    chunk: int,
    document_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dw, dtemp, ddenom_bias or empty, dweight or empty); grad_out is dL/dc, or dL/dy with a
    projection. The bias's gradient, grad_out summed, is left to the autograd function."""
    B, K, T, p = w.shape
    if weight is None:
        dw, dtemp, ddenom_bias = tssa_backward(
            grad_out, grad_pi, w, temp, denom_bias, pi, logits, S0, M0, P0, causal, eps, chunk, None, document_ids
        )
        return dw, dtemp, _or_empty(ddenom_bias, temp), temp.new_empty(0)
    grad_c = torch.matmul(grad_out, weight).view(B, T, K, p).transpose(1, 2)
    c = _empty_like_output(w, causal)
    dw, dtemp, ddenom_bias = tssa_backward(
        grad_c, grad_pi, w, temp, denom_bias, pi, logits, S0, M0, P0, causal, eps, chunk, c, document_ids
    )
    del grad_c
    c_rows = _merged(c)  # (B, T, D)
    dweight = torch.zeros_like(weight)
    for b in range(B):
        dweight.addmm_(grad_out[b].t(), c_rows[b])
    return dw, dtemp, _or_empty(ddenom_bias, temp), dweight


@_tssa_backward_op.register_fake
def _tssa_backward_op_fake(
    grad_out: Tensor,
    grad_pi: Tensor | None,
    w: Tensor,
    temp: Tensor,
    denom_bias: Tensor | None,
    weight: Tensor | None,
    pi: Tensor,
    logits: Tensor,
    S0: Tensor,
    M0: Tensor,
    P0: Tensor,
    causal: bool,
    eps: float,
    chunk: int,
    document_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return (
        _empty_like_output(w, causal),
        torch.empty_like(temp),
        _or_empty(None if denom_bias is None else torch.empty_like(denom_bias), temp),
        _or_empty(None if weight is None else torch.empty_like(weight), temp),
    )


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:  # noqa: ANN001 (torch's ctx)
    w, temp, denom_bias, weight, bias, causal, eps, chunk, document_ids = inputs
    _, pi, logits, S0, M0, P0 = output
    ctx.save_for_backward(w, temp, denom_bias, weight, pi, logits, S0, M0, P0, document_ids)
    ctx.has_bias, ctx.causal, ctx.eps, ctx.chunk = bias is not None, causal, eps, chunk


def _backward(ctx, grad_out: Tensor | None, grad_pi: Tensor | None, *unused: Tensor | None) -> tuple:  # noqa: ANN001
    w, temp, denom_bias, weight, pi, logits, S0, M0, P0, document_ids = ctx.saved_tensors
    if grad_out is None:
        grad_out = _output_like(w, weight, ctx.causal).zero_()
    dw, dtemp, ddenom_bias, dweight = _tssa_backward_op(
        grad_out,
        grad_pi,
        w,
        temp,
        denom_bias,
        weight,
        pi,
        logits,
        S0,
        M0,
        P0,
        ctx.causal,
        ctx.eps,
        ctx.chunk,
        document_ids,
    )
    dbias = grad_out.sum((0, 1)) if ctx.has_bias else None
    return (
        dw,
        dtemp,
        None if denom_bias is None else ddenom_bias,
        None if weight is None else dweight,
        dbias,
        None,
        None,
        None,
        None,
    )


_tssa_op.register_autograd(_backward, setup_context=_setup_context)


# torch's FlopCounterMode counts matmuls only. It sees the projection fused into the operator
# through these formulas; TSSA's own elementwise work is charged by TSSA.flops_per_token.
@register_flop_formula(torch.ops.whitebox.tssa)
def _tssa_flops(w_shape, temp_shape, denom_bias_shape, weight_shape, *args, **kwargs) -> int:  # noqa: ANN001
    B, K, T, p = w_shape
    return 0 if weight_shape is None else 2 * B * T * weight_shape[0] * weight_shape[1]


@register_flop_formula(torch.ops.whitebox.tssa_backward)
def _tssa_backward_flops(
    grad_shape, grad_pi_shape, w_shape, temp_shape, denom_bias_shape, weight_shape, *args, **kwargs
) -> int:  # noqa: ANN001
    B, K, T, p = w_shape
    return 0 if weight_shape is None else 4 * B * T * weight_shape[0] * weight_shape[1]


def token_statistics_fused(
    w: Tensor,
    temp: Tensor,
    *,
    causal: bool,
    denom_bias: Tensor | None = None,
    eps: float = ENERGY_EPS,
    chunk: int = CHUNK_TOKENS,
    document_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`token_statistics` (pretrain/models/tssa.py) as one operator: (c (B, K, N, p), pi (B, K, N)),
    equal to the reference to rounding, with a fraction of its time and saved memory. Causal, c is
    stored coordinate-major (its transpose(2, 3) is contiguous); else token-major, like w."""
    check_documents(causal, document_ids)
    c, pi, *_ = _tssa_op(w, temp, denom_bias, None, None, causal, eps, chunk, document_ids)
    return c, pi


def projected_token_statistics_fused(
    w: Tensor,
    temp: Tensor,
    out_proj: torch.nn.Linear,
    *,
    causal: bool,
    denom_bias: Tensor | None = None,
    eps: float = ENERGY_EPS,
    chunk: int = CHUNK_TOKENS,
    document_ids: Tensor | None = None,
) -> Tensor:
    """out_proj(merge_heads(c)) (B, N, D) in one operator that keeps w, not c, for backward.
    Under autocast, out_proj's weight is cast as autocast would cast it for a Linear."""
    check_documents(causal, document_ids)
    weight, bias = out_proj.weight, out_proj.bias
    if torch.is_autocast_enabled(w.device.type):
        dtype = torch.get_autocast_dtype(w.device.type)
        weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)
    return _tssa_op(w, temp, denom_bias, weight, bias, causal, eps, chunk, document_ids)[0]


def check_documents(causal: bool, document_ids: Tensor | None) -> None:
    if document_ids is not None and not causal:
        raise ValueError("document_ids need causal TSSA: non-causal statistics have no document masking")
