"""Token Statistics Self-Attention as Triton kernels: forward and hand-written backward, causal and
non-causal, computed as chunked scans along the sequence.

The function is `token_statistics` (pretrain/models/tssa.py); the backward formulas and the saved
tensors (w, pi, logits, the statistics at each chunk's start) are those of pretrain/models/tssa_fused.py,
whose docstring derives them. Each kernel runs one program per (batch * head, chunk of CHUNK tokens),
holding a CHUNK x p tile: a chunk's statistics are its carry (the sum over earlier chunks, a tiny
torch cumsum over per-chunk sums) plus tl.cumsum within the chunk, so chunks run in parallel.

    forward:  chunk sums of w^2 -> S carries -> logits kernel -> pi = softmax over heads (torch)
              -> chunk sums of pi w^2 and pi -> M, P carries -> output kernel (c)
    backward: chunk sums of dL/dM, dL/dQ -> suffix carries -> dL/dpi kernel -> softmax backward
              over heads (torch) -> chunk sums of dL/dS -> suffix carry -> dL/dw kernel

pi couples the K heads of a token, so the softmax and its backward sit between kernels as small
(B, K, T) torch ops. Non-causal (CAUSAL=False), every carry is the total over all chunks and no
scan runs within a chunk. Statistics accumulate in fp32 whatever w's dtype.

With document ids (causal only), the scans within a chunk are segmented (tl.associative_scan over
(value, document) pairs, adding only a token's own document), a chunk's sums and carries are those
of its last document (of its first, for backward's suffix carries), and a carry reaches only the
tokens of the document it comes from.

The passes are registered as torch custom ops (`whitebox::tssa_triton`, `whitebox::tssa_triton_backward`)
with fake implementations, so torch.compile, activation checkpointing and FSDP2 see one opaque op.
The kernels need CUDA; or, to run on CPU tensors in Triton's interpreter as the tests do,
TRITON_INTERPRET=1 in the environment before triton is imported (its @triton.jit reads it as it
decorates each function, Triton's own included), in practice when the process starts.
"""

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from pretrain.models.tssa import (
    ENERGY_EPS,
    MEMBERSHIP_EPS,
    document_cumsum,
    document_positions,
    positional_prior,
)
from pretrain.models.tssa_fused import check_documents, membership_grad, prior_grad

# Tokens per program. Not timed on a GPU: chosen so that the largest kernel (dL/dw, some seven
# CHUNK x p fp32 tiles) does not spill at p = 64 with Triton's default 4 warps. ptxas for sm_90
# gives it 179 registers and no spills at 32 tokens, and 364 bytes of spills at 64.
CHUNK_TOKENS = 32

_MEMBERSHIP_EPS = tl.constexpr(MEMBERSHIP_EPS)
_NO_DOCUMENT = tl.constexpr(2**40)  # the document id of a position outside the sequence: no token's
# Whether @triton.jit made Triton's functions (tl.sum, ...) and the kernels below interpreted ones:
# then the kernels run on CPU tensors.
_INTERPRETED = not isinstance(tl.sum, triton.runtime.JITFunction)


def available() -> str | None:
    """None when the kernels can run here, else why not (one line)."""
    if _INTERPRETED or torch.cuda.is_available():
        return None
    return (
        "model.tssa_impl=triton needs CUDA (or, for Triton's interpreter on CPU, TRITON_INTERPRET=1 in the "
        "environment of the process from its start); torch sees no CUDA device"
    )


@triton.jit
def _tile(bk, chunk, K, T, p, s_b, s_k, s_t, s_p, CHUNK: tl.constexpr, BLOCK_P: tl.constexpr):
    """Program (bk, chunk)'s CHUNK x BLOCK_P tile of a (B, K, T, p) tensor with strides s_*: (offsets,
    mask, token indices, coordinate indices)."""
    t = chunk * CHUNK + tl.arange(0, CHUNK)
    j = tl.arange(0, BLOCK_P)
    offsets = (bk // K) * s_b + (bk % K) * s_k + t[:, None] * s_t + j[None, :] * s_p
    return offsets, (t[:, None] < T) & (j[None, :] < p), t, j


@triton.jit
def _document_of(doc_ptr, bk, K, T, t, HAS_DOCS: tl.constexpr):
    """Document ids of positions t (a block or one) of row bk // K; 0 without documents."""
    if HAS_DOCS:
        return tl.load(doc_ptr + (bk // K) * T + t, mask=(t >= 0) & (t < T), other=_NO_DOCUMENT)
    else:
        return t * 0


@triton.jit
def _chunk_documents(doc_ptr, bk, chunk, K, T, t, CHUNK: tl.constexpr, HAS_DOCS: tl.constexpr):
    """The documents of the chunk's tokens t, of the token before the chunk and of the token after it."""
    before = _document_of(doc_ptr, bk, K, T, chunk * CHUNK - 1, HAS_DOCS)
    after = _document_of(doc_ptr, bk, K, T, chunk * CHUNK + CHUNK, HAS_DOCS)
    return _document_of(doc_ptr, bk, K, T, t, HAS_DOCS), before, after


@triton.jit
def _same_document_sum(x1, key1, x2, key2):
    """Combines two spans' (sum, key): the sum over the tokens of the larger key (the later document
    of a prefix; the earlier, keys negated, of a suffix), an associative segmented sum."""
    key = tl.maximum(key1, key2)
    return tl.where(key1 == key, x1, 0.0) + tl.where(key2 == key, x2, 0.0), key


@triton.jit
def _scan(x, carry, doc, carry_doc, REVERSE: tl.constexpr, HAS_DOCS: tl.constexpr):
    """carry + the prefix (suffix, REVERSE) sums of x along the chunk's tokens (axis 0). With
    documents (doc: x's tokens', broadcastable to x), a token sums its own document's tokens and
    takes the carry only if it is in carry_doc, the document of the token before (after) the chunk."""
    if HAS_DOCS:
        if REVERSE:
            key = tl.broadcast_to(-doc, x.shape)
        else:
            key = tl.broadcast_to(doc, x.shape)
        sums, _ = tl.associative_scan((x, key), 0, _same_document_sum, reverse=REVERSE)
        return tl.where(doc == carry_doc, carry, 0.0) + sums
    else:
        return carry + tl.cumsum(x, axis=0, reverse=REVERSE)


@triton.jit
def _carry_row(bk, chunk, CAUSAL: tl.constexpr):
    """Row of a (B * K, NC or 1) carry that program (bk, chunk) starts from: its chunk's, or the total."""
    if CAUSAL:
        return bk * tl.num_programs(1) + chunk
    else:
        return bk


@triton.jit
def _energy_totals(w2, S_start_ptr, row, j, p, doc, prev_doc, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr):
    """S = sum of w^2 over the tokens up to each one (causal) or over all of them: (CHUNK or 1, BLOCK_P)."""
    S = tl.load(S_start_ptr + row * p + j, mask=j < p, other=0.0)[None, :]
    if CAUSAL:
        S = _scan(w2, S, doc[:, None], prev_doc, False, HAS_DOCS)
    return S


@triton.jit
def _membership_totals(
    w2,
    pi,
    M_start_ptr,
    P_start_ptr,
    row,
    j,
    p,
    doc,
    prev_doc,
    CAUSAL: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """M = sum of pi w^2 (CHUNK or 1, BLOCK_P) and Q = sum of pi + MEMBERSHIP_EPS (CHUNK,), over the
    tokens up to each one (causal) or over all of them."""
    M = tl.load(M_start_ptr + row * p + j, mask=j < p, other=0.0)[None, :]
    P = tl.load(P_start_ptr + row)
    if CAUSAL:
        M = _scan(pi[:, None] * w2, M, doc[:, None], prev_doc, False, HAS_DOCS)
        Q = _scan(pi, P, doc, prev_doc, False, HAS_DOCS) + _MEMBERSHIP_EPS
    else:
        Q = tl.zeros([CHUNK], tl.float32) + (P + _MEMBERSHIP_EPS)
    return M, Q


@triton.jit
def _grads_through_m(g, w, pi, M, Q):
    """(r, dL/dM, dL/dQ) of a tile, from m = M / Q, r = 1 / (1 + m), c = -pi w r and g = dL/dc."""
    m = M / Q[:, None]
    r = 1 / (1 + m)
    gm = g * r * r * w * pi[:, None]  # dL/dm
    return r, gm / Q[:, None], -tl.sum(gm * m, axis=1) / Q


@triton.jit
def _chunk_sums_kernel(
    w_ptr,
    weight_ptr,
    w2_sums_ptr,
    weight_sums_ptr,
    doc_ptr,
    K,
    T,
    p,
    s_b,
    s_k,
    s_t,
    s_p,
    HAS_WEIGHT: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Per chunk, the sums over its tokens (of its last document's) of weight w^2 (p) and of weight
    (weight: 1 without HAS_WEIGHT)."""
    bk = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offsets, mask, t, j = _tile(bk, chunk, K, T, p, s_b, s_k, s_t, s_p, CHUNK, BLOCK_P)
    last_doc = _document_of(doc_ptr, bk, K, T, tl.minimum(chunk * CHUNK + CHUNK, T) - 1, HAS_DOCS)
    in_doc = _document_of(doc_ptr, bk, K, T, t, HAS_DOCS) == last_doc
    w = tl.load(w_ptr + offsets, mask=mask & in_doc[:, None], other=0.0).to(tl.float32)
    w2 = w * w
    row = bk * tl.num_programs(1) + chunk
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + bk * T + t, mask=(t < T) & in_doc, other=0.0)
        w2 = weight[:, None] * w2
        tl.store(weight_sums_ptr + row, tl.sum(weight, axis=0))
    tl.store(w2_sums_ptr + row * p + j, tl.sum(w2, axis=0), mask=j < p)


@triton.jit
def _logits_kernel(
    w_ptr,
    S_start_ptr,
    bias_ptr,
    logits_ptr,
    doc_ptr,
    eps,
    K,
    T,
    p,
    s_b,
    s_k,
    s_t,
    s_p,
    s_bias_b,
    s_bias_k,
    s_bias_t,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """logits = sum_j w^2 / max(S, eps) (+ p denom_bias at the token's position) per token: (B, K, T)."""
    bk = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offsets, mask, t, j = _tile(bk, chunk, K, T, p, s_b, s_k, s_t, s_p, CHUNK, BLOCK_P)
    w = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    w2 = w * w
    doc, prev_doc, _ = _chunk_documents(doc_ptr, bk, chunk, K, T, t, CHUNK, HAS_DOCS)
    S = _energy_totals(w2, S_start_ptr, _carry_row(bk, chunk, CAUSAL), j, p, doc, prev_doc, CAUSAL, HAS_DOCS)
    logits = tl.sum(w2 / tl.maximum(S, eps), axis=1)
    if HAS_BIAS:
        bias_offsets = (bk // K) * s_bias_b + (bk % K) * s_bias_k + t * s_bias_t
        bias = tl.load(bias_ptr + bias_offsets, mask=t < T, other=0.0)
        logits += p * bias.to(tl.float32)
    tl.store(logits_ptr + bk * T + t, logits, mask=t < T)


@triton.jit
def _output_kernel(
    w_ptr,
    pi_ptr,
    M_start_ptr,
    P_start_ptr,
    c_ptr,
    doc_ptr,
    K,
    T,
    p,
    s_b,
    s_k,
    s_t,
    s_p,
    CAUSAL: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """c = -pi w / (1 + M / Q), in c's dtype."""
    bk = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offsets, mask, t, j = _tile(bk, chunk, K, T, p, s_b, s_k, s_t, s_p, CHUNK, BLOCK_P)
    w = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    pi = tl.load(pi_ptr + bk * T + t, mask=t < T, other=0.0)
    row = _carry_row(bk, chunk, CAUSAL)
    doc, prev_doc, _ = _chunk_documents(doc_ptr, bk, chunk, K, T, t, CHUNK, HAS_DOCS)
    M, Q = _membership_totals(w * w, pi, M_start_ptr, P_start_ptr, row, j, p, doc, prev_doc, CAUSAL, HAS_DOCS, CHUNK)
    c = -pi[:, None] * w / (1 + M / Q[:, None])
    tl.store(c_ptr + offsets, c.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _membership_grad_sums_kernel(
    w_ptr,
    g_ptr,
    pi_ptr,
    M_start_ptr,
    P_start_ptr,
    dM_sums_ptr,
    dQ_sums_ptr,
    doc_ptr,
    K,
    T,
    p,
    s_b,
    s_k,
    s_t,
    s_p,
    CAUSAL: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Per chunk, the sums over its tokens (of its first document's) of dL/dM (p) and dL/dQ."""
    bk = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offsets, mask, t, j = _tile(bk, chunk, K, T, p, s_b, s_k, s_t, s_p, CHUNK, BLOCK_P)
    w = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    pi = tl.load(pi_ptr + bk * T + t, mask=t < T, other=0.0)
    doc, prev_doc, _ = _chunk_documents(doc_ptr, bk, chunk, K, T, t, CHUNK, HAS_DOCS)
    row = _carry_row(bk, chunk, CAUSAL)
    M, Q = _membership_totals(w * w, pi, M_start_ptr, P_start_ptr, row, j, p, doc, prev_doc, CAUSAL, HAS_DOCS, CHUNK)
    _, dM, dQ = _grads_through_m(g, w, pi, M, Q)
    in_doc = doc == _document_of(doc_ptr, bk, K, T, chunk * CHUNK, HAS_DOCS)
    dM, dQ = tl.where(in_doc[:, None], dM, 0.0), tl.where(in_doc, dQ, 0.0)
    row = bk * tl.num_programs(1) + chunk
    tl.store(dM_sums_ptr + row * p + j, tl.sum(dM, axis=0), mask=j < p)
    tl.store(dQ_sums_ptr + row, tl.sum(dQ, axis=0))


@triton.jit
def _membership_grad_kernel(
    w_ptr,
    g_ptr,
    pi_ptr,
    M_start_ptr,
    P_start_ptr,
    RM_start_ptr,
    RQ_start_ptr,
    gpi_ptr,
    doc_ptr,
    K,
    T,
    p,
    s_b,
    s_k,
    s_t,
    s_p,
    CAUSAL: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """dL/dpi through c = -pi w r and through the statistics M, Q, per token: (B, K, T)."""
    bk = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offsets, mask, t, j = _tile(bk, chunk, K, T, p, s_b, s_k, s_t, s_p, CHUNK, BLOCK_P)
    w = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    pi = tl.load(pi_ptr + bk * T + t, mask=t < T, other=0.0)
    w2 = w * w
    row = _carry_row(bk, chunk, CAUSAL)
    doc, prev_doc, next_doc = _chunk_documents(doc_ptr, bk, chunk, K, T, t, CHUNK, HAS_DOCS)
    M, Q = _membership_totals(w2, pi, M_start_ptr, P_start_ptr, row, j, p, doc, prev_doc, CAUSAL, HAS_DOCS, CHUNK)
    r, dM, dQ = _grads_through_m(g, w, pi, M, Q)
    RM = tl.load(RM_start_ptr + row * p + j, mask=j < p, other=0.0)[None, :]
    RQ = tl.load(RQ_start_ptr + row)
    if CAUSAL:
        RM = _scan(dM, RM, doc[:, None], next_doc, True, HAS_DOCS)
        RQ = _scan(dQ, RQ, doc, next_doc, True, HAS_DOCS)
    gpi = -tl.sum(g * r * w, axis=1) + tl.sum(RM * w2, axis=1) + RQ
    tl.store(gpi_ptr + bk * T + t, gpi, mask=t < T)


@triton.jit
def _energy_grad_sums_kernel(
    w_ptr,
    S_start_ptr,
    dlogits_ptr,
    dS_sums_ptr,
    doc_ptr,
    eps,
    K,
    T,
    p,
    s_b,
    s_k,
    s_t,
    s_p,
    CAUSAL: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Per chunk, the sum over its tokens (of its first document's) of dL/dS = -dL/dlogits w^2 /
    max(S, eps)^2 (where S >= eps)."""
    bk = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offsets, mask, t, j = _tile(bk, chunk, K, T, p, s_b, s_k, s_t, s_p, CHUNK, BLOCK_P)
    w = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    w2 = w * w
    doc, prev_doc, _ = _chunk_documents(doc_ptr, bk, chunk, K, T, t, CHUNK, HAS_DOCS)
    S = _energy_totals(w2, S_start_ptr, _carry_row(bk, chunk, CAUSAL), j, p, doc, prev_doc, CAUSAL, HAS_DOCS)
    Sc = tl.maximum(S, eps)
    in_doc = doc == _document_of(doc_ptr, bk, K, T, chunk * CHUNK, HAS_DOCS)
    dlogits = tl.load(dlogits_ptr + bk * T + t, mask=(t < T) & in_doc, other=0.0)
    dS = tl.where(S >= eps, -(dlogits[:, None] / Sc) * w2 / Sc, 0.0)
    row = bk * tl.num_programs(1) + chunk
    tl.store(dS_sums_ptr + row * p + j, tl.sum(dS, axis=0), mask=j < p)


@triton.jit
def _input_grad_kernel(
    w_ptr,
    g_ptr,
    pi_ptr,
    dlogits_ptr,
    S_start_ptr,
    M_start_ptr,
    P_start_ptr,
    RM_start_ptr,
    RS_start_ptr,
    dw_ptr,
    doc_ptr,
    eps,
    K,
    T,
    p,
    s_b,
    s_k,
    s_t,
    s_p,
    CAUSAL: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """dL/dw = -g pi r + 2 w (dL/dlogits / Sc + pi R_M + R_S), in dw's dtype."""
    bk = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offsets, mask, t, j = _tile(bk, chunk, K, T, p, s_b, s_k, s_t, s_p, CHUNK, BLOCK_P)
    w = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    pi = tl.load(pi_ptr + bk * T + t, mask=t < T, other=0.0)
    dlogits = tl.load(dlogits_ptr + bk * T + t, mask=t < T, other=0.0)
    w2 = w * w
    row = _carry_row(bk, chunk, CAUSAL)
    doc, prev_doc, next_doc = _chunk_documents(doc_ptr, bk, chunk, K, T, t, CHUNK, HAS_DOCS)
    S = _energy_totals(w2, S_start_ptr, row, j, p, doc, prev_doc, CAUSAL, HAS_DOCS)
    Sc = tl.maximum(S, eps)
    M, Q = _membership_totals(w2, pi, M_start_ptr, P_start_ptr, row, j, p, doc, prev_doc, CAUSAL, HAS_DOCS, CHUNK)
    r, dM, _ = _grads_through_m(g, w, pi, M, Q)
    RM = tl.load(RM_start_ptr + row * p + j, mask=j < p, other=0.0)[None, :]
    RS = tl.load(RS_start_ptr + row * p + j, mask=j < p, other=0.0)[None, :]
    if CAUSAL:
        RM = _scan(dM, RM, doc[:, None], next_doc, True, HAS_DOCS)
        dS = tl.where(S >= eps, -(dlogits[:, None] / Sc) * w2 / Sc, 0.0)
        RS = _scan(dS, RS, doc[:, None], next_doc, True, HAS_DOCS)
    dw = -g * pi[:, None] * r + 2 * w * (dlogits[:, None] / Sc + pi[:, None] * RM + RS)
    tl.store(dw_ptr + offsets, dw.to(dw_ptr.dtype.element_ty), mask=mask)


def _carries(sums: Tensor, causal: bool, *, reverse: bool = False, documents: Tensor | None = None) -> Tensor:
    """What each chunk starts from, given per-chunk sums (B, K, NC, ...): the sum over the chunks
    before it (after it, when reverse), or, non-causal, the total over all chunks (B, K, 1, ...).
    With documents (B, NC), the document whose tokens each chunk's sum holds (its last, or first
    when reverse), only the chunks of the document of the token before (after) the chunk count."""
    if not causal:
        return sums.sum(2, keepdim=True)
    if reverse:
        flipped = sums.flip(2)
        totals = (flipped.cumsum(2) if documents is None else document_cumsum(flipped, documents.flip(1))).flip(2)
    else:
        totals = sums.cumsum(2) if documents is None else document_cumsum(sums, documents)
    carries = torch.zeros_like(sums)
    if reverse:
        carries[:, :, :-1] = totals[:, :, 1:]
    else:
        carries[:, :, 1:] = totals[:, :, :-1]
    return carries


def _chunk_ends(document_ids: Tensor | None, chunk: int) -> tuple[Tensor | None, Tensor | None]:
    """The documents of each chunk's first and last tokens, (B, NC) each (None without documents)."""
    if document_ids is None:
        return None, None
    starts = torch.arange(0, document_ids.shape[1], chunk, device=document_ids.device)
    return document_ids[:, starts], document_ids[:, (starts + chunk).clamp_max(document_ids.shape[1]) - 1]


def _layout(
    w: Tensor, chunk: int, document_ids: Tensor | None
) -> tuple[tuple[int, int], Tensor, tuple[int, ...], dict[str, int]]:
    """For w (B, K, T, p): the grid, the document ids' pointer (w's, never read, without them),
    the layout arguments that every kernel takes (K, T, p and the strides of w, c, grad_c and dw),
    and the compile-time ones (tile sizes, HAS_DOCS)."""
    B, K, T, p = w.shape
    return (
        (B * K, triton.cdiv(T, chunk)),
        w if document_ids is None else document_ids.contiguous(),
        (K, T, p, *w.stride()),
        {"CHUNK": chunk, "BLOCK_P": triton.next_power_of_2(p), "HAS_DOCS": document_ids is not None},
    )


def _dense_like(w: Tensor) -> tuple[Tensor, Tensor]:
    """(w, an empty tensor of its shape, dtype and strides), w made contiguous first if it is not
    dense, so that one set of strides addresses w, c, grad_c and dw; the fake ops' empty_like agrees."""
    out = torch.empty_like(w)
    return (w, out) if out.stride() == w.stride() else (w.contiguous(), out)


def _stat_shapes(w: Tensor, causal: bool, chunk: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of the saved statistics at each chunk's start (or their totals): (B, K, NC, p), (B, K, NC)."""
    B, K, T, p = w.shape
    n = triton.cdiv(T, chunk) if causal else 1
    return (B, K, n, p), (B, K, n)


@torch.library.custom_op("whitebox::tssa_triton", mutates_args=())
def _tssa_forward(
    w: Tensor,
    temp: Tensor,
    denom_bias: Tensor | None,
    causal: bool,
    eps: float,
    chunk: int,
    document_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(c, pi, logits, S, M, P at each chunk's start or their totals): the output and what backward keeps."""
    B, K, T, p = w.shape
    w, c = _dense_like(w)
    grid, docs, dims, meta = _layout(w, chunk, document_ids)
    _, last_documents = _chunk_ends(document_ids, chunk)
    f32 = {"dtype": torch.float32, "device": w.device}
    w2_sums = torch.empty(B, K, grid[1], p, **f32)
    _chunk_sums_kernel[grid](w, w, w2_sums, w2_sums, docs, *dims, HAS_WEIGHT=False, **meta)
    S_start = _carries(w2_sums, causal, documents=last_documents)
    logits = torch.empty(B, K, T, **f32)
    bias, bias_strides = w, (0, 0, 0)  # without a prior, w: a pointer never read
    if denom_bias is not None and document_ids is not None:  # (B, K, T): the prior at positions within documents
        bias = positional_prior(denom_bias, T, document_positions(document_ids))
        bias_strides = bias.stride()
    elif denom_bias is not None:  # (K, >= T), the same for every row
        bias, bias_strides = denom_bias, (0, *denom_bias.stride())
    _logits_kernel[grid](
        w,
        S_start,
        bias,
        logits,
        docs,
        eps,
        *dims,
        *bias_strides,
        CAUSAL=causal,
        HAS_BIAS=denom_bias is not None,
        **meta,
    )
    pi = (temp.float() * logits).softmax(dim=1)  # (B, K, T): over heads
    M_sums, P_sums = torch.empty_like(w2_sums), torch.empty(B, K, grid[1], **f32)
    _chunk_sums_kernel[grid](w, pi, M_sums, P_sums, docs, *dims, HAS_WEIGHT=True, **meta)
    M_start = _carries(M_sums, causal, documents=last_documents)
    P_start = _carries(P_sums, causal, documents=last_documents)
    _output_kernel[grid](w, pi, M_start, P_start, c, docs, *dims, CAUSAL=causal, **meta)
    return c, pi, logits, S_start, M_start, P_start


@_tssa_forward.register_fake
def _(
    w: Tensor, temp: Tensor, denom_bias: Tensor | None, causal: bool, eps: float, chunk: int, *_: Any
) -> tuple[Tensor, ...]:
    B, K, T, _ = w.shape
    stats, per_chunk = _stat_shapes(w, causal, chunk)
    f32 = {"dtype": torch.float32, "device": w.device}
    fp32_outputs = [w.new_empty(shape, **f32) for shape in ((B, K, T), (B, K, T), stats, stats, per_chunk)]
    return torch.empty_like(w), *fp32_outputs


@torch.library.custom_op("whitebox::tssa_triton_backward", mutates_args=())
def _tssa_backward(
    grad_c: Tensor,
    grad_pi: Tensor | None,
    w: Tensor,
    temp: Tensor,
    pi: Tensor,
    logits: Tensor,
    S_start: Tensor,
    M_start: Tensor,
    P_start: Tensor,
    causal: bool,
    eps: float,
    chunk: int,
    document_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dw, dtemp, dL/dlogits (B, K, T) fp32, from which the caller sums ddenom_bias)."""
    w, dw = _dense_like(w)
    if grad_c.stride() != dw.stride():
        grad_c = torch.empty_like(dw).copy_(grad_c)
    grid, docs, dims, meta = _layout(w, chunk, document_ids)
    first_documents, _ = _chunk_ends(document_ids, chunk)
    B, K, _, p = w.shape
    dM_sums = torch.empty(B, K, grid[1], p, dtype=torch.float32, device=w.device)
    dQ_sums = torch.empty(B, K, grid[1], dtype=torch.float32, device=w.device)
    _membership_grad_sums_kernel[grid](
        w, grad_c, pi, M_start, P_start, dM_sums, dQ_sums, docs, *dims, CAUSAL=causal, **meta
    )
    RM_start = _carries(dM_sums, causal, reverse=True, documents=first_documents)
    RQ_start = _carries(dQ_sums, causal, reverse=True, documents=first_documents)
    gpi = torch.empty_like(pi)
    _membership_grad_kernel[grid](
        w, grad_c, pi, M_start, P_start, RM_start, RQ_start, gpi, docs, *dims, CAUSAL=causal, **meta
    )
    if grad_pi is not None:
        gpi += grad_pi
    dlogits, dtemp = membership_grad(gpi, pi, logits, temp.float())
    dtemp = dtemp.to(temp.dtype)
    dS_sums = torch.empty_like(dM_sums)
    _energy_grad_sums_kernel[grid](w, S_start, dlogits, dS_sums, docs, eps, *dims, CAUSAL=causal, **meta)
    RS_start = _carries(dS_sums, causal, reverse=True, documents=first_documents)
    starts = (S_start, M_start, P_start, RM_start, RS_start)
    _input_grad_kernel[grid](w, grad_c, pi, dlogits, *starts, dw, docs, eps, *dims, CAUSAL=causal, **meta)
    return dw, dtemp, dlogits


@_tssa_backward.register_fake
def _(grad_c: Tensor, grad_pi: Tensor | None, w: Tensor, temp: Tensor, pi: Tensor, *_: Any) -> tuple[Tensor, ...]:
    return torch.empty_like(w), torch.empty_like(temp), torch.empty_like(pi)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    w, temp, denom_bias, ctx.causal, ctx.eps, ctx.chunk, document_ids = inputs
    ctx.save_for_backward(w, temp, document_ids, *output[1:])
    ctx.bias_shape = None if denom_bias is None else (denom_bias.shape, denom_bias.dtype)


def _backward(ctx: Any, grad_c: Tensor | None, grad_pi: Tensor | None, *_: Any) -> tuple[Tensor | None, ...]:
    w, temp, document_ids, *saved = ctx.saved_tensors
    if grad_c is None:
        grad_c = torch.zeros_like(w)
    dw, dtemp, dlogits = _tssa_backward(grad_c, grad_pi, w, temp, *saved, ctx.causal, ctx.eps, ctx.chunk, document_ids)
    ddenom_bias = None
    if ctx.bias_shape is not None:
        ddenom_bias = prior_grad(dlogits, w.shape[-1], *ctx.bias_shape, document_ids)
    return dw, dtemp, ddenom_bias, None, None, None, None


_tssa_forward.register_autograd(_backward, setup_context=_setup_context)


def token_statistics_triton(
    w: Tensor,
    temp: Tensor,
    *,
    causal: bool,
    denom_bias: Tensor | None = None,
    eps: float = ENERGY_EPS,
    chunk: int = CHUNK_TOKENS,
    document_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`token_statistics` (pretrain/models/tssa.py) computed by the Triton kernels: w (B, K, T, p),
    temp (K, 1), denom_bias (K, >= T) or None, document_ids (B, T) or None -> (c in w's dtype, pi
    in fp32). chunk (tokens per program) must be a power of two."""
    if chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two, not {chunk}")
    if not w.is_cuda and not _INTERPRETED:
        raise RuntimeError(
            f"the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 from the start; w is on {w.device}"
        )
    check_documents(causal, document_ids)
    c, pi, *_ = _tssa_forward(w, temp, denom_bias, causal, eps, chunk, document_ids)
    return c, pi
