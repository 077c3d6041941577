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

from pretrain.models.tssa import ENERGY_EPS, MEMBERSHIP_EPS
from pretrain.models.tssa_fused import membership_grad

# Tokens per program. Not timed on a GPU: chosen so that the largest kernel (dL/dw, some seven
# CHUNK x p fp32 tiles) does not spill at p = 64 with Triton's default 4 warps. ptxas for sm_90
# gives it 179 registers and no spills at 32 tokens, and 364 bytes of spills at 64.
CHUNK_TOKENS = 32

_MEMBERSHIP_EPS = tl.constexpr(MEMBERSHIP_EPS)
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
def _carry_row(bk, chunk, CAUSAL: tl.constexpr):
    """Row of a (B * K, NC or 1) carry that program (bk, chunk) starts from: its chunk's, or the total."""
    if CAUSAL:
        return bk * tl.num_programs(1) + chunk
    else:
        return bk


@triton.jit
def _energy_totals(w2, S_start_ptr, row, j, p, CAUSAL: tl.constexpr):
    """S = sum of w^2 over the tokens up to each one (causal) or over all of them: (CHUNK or 1, BLOCK_P)."""
    S = tl.load(S_start_ptr + row * p + j, mask=j < p, other=0.0)[None, :]
    if CAUSAL:
        S = S + tl.cumsum(w2, axis=0)
    return S


@triton.jit
def _membership_totals(w2, pi, M_start_ptr, P_start_ptr, row, j, p, CAUSAL: tl.constexpr, CHUNK: tl.constexpr):
    """M = sum of pi w^2 (CHUNK or 1, BLOCK_P) and Q = sum of pi + MEMBERSHIP_EPS (CHUNK,), over the
    tokens up to each one (causal) or over all of them."""
    M = tl.load(M_start_ptr + row * p + j, mask=j < p, other=0.0)[None, :]
    P = tl.load(P_start_ptr + row)
    if CAUSAL:
        M = M + tl.cumsum(pi[:, None] * w2, axis=0)
        Q = P + tl.cumsum(pi, axis=0) + _MEMBERSHIP_EPS
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
    K,
    T,
    p,
    s_b,
    s_k,
    s_t,
    s_p,
    HAS_WEIGHT: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Per chunk, the sums over its tokens of weight w^2 (p) and of weight (weight: 1 without HAS_WEIGHT)."""
    bk = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offsets, mask, t, j = _tile(bk, chunk, K, T, p, s_b, s_k, s_t, s_p, CHUNK, BLOCK_P)
    w = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    w2 = w * w
    row = bk * tl.num_programs(1) + chunk
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + bk * T + t, mask=t < T, other=0.0)
        w2 = weight[:, None] * w2
        tl.store(weight_sums_ptr + row, tl.sum(weight, axis=0))
    tl.store(w2_sums_ptr + row * p + j, tl.sum(w2, axis=0), mask=j < p)


@triton.jit
def _logits_kernel(
    w_ptr,
    S_start_ptr,
    bias_ptr,
    logits_ptr,
    eps,
    K,
    T,
    p,
    s_b,
    s_k,
    s_t,
    s_p,
    s_bias_k,
    s_bias_t,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """logits = sum_j w^2 / max(S, eps) (+ p denom_bias) per token: (B, K, T)."""
    bk = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offsets, mask, t, j = _tile(bk, chunk, K, T, p, s_b, s_k, s_t, s_p, CHUNK, BLOCK_P)
    w = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    w2 = w * w
    S = _energy_totals(w2, S_start_ptr, _carry_row(bk, chunk, CAUSAL), j, p, CAUSAL)
    logits = tl.sum(w2 / tl.maximum(S, eps), axis=1)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + (bk % K) * s_bias_k + t * s_bias_t, mask=t < T, other=0.0)
        logits += p * bias.to(tl.float32)
    tl.store(logits_ptr + bk * T + t, logits, mask=t < T)


@triton.jit
def _output_kernel(
    w_ptr,
    pi_ptr,
    M_start_ptr,
    P_start_ptr,
    c_ptr,
    K,
    T,
    p,
    s_b,
    s_k,
    s_t,
    s_p,
    CAUSAL: tl.constexpr,
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
    M, Q = _membership_totals(w * w, pi, M_start_ptr, P_start_ptr, row, j, p, CAUSAL, CHUNK)
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
    K,
    T,
    p,
    s_b,
    s_k,
    s_t,
    s_p,
    CAUSAL: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Per chunk, the sums over its tokens of dL/dM (p) and dL/dQ."""
    bk = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offsets, mask, t, j = _tile(bk, chunk, K, T, p, s_b, s_k, s_t, s_p, CHUNK, BLOCK_P)
    w = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    pi = tl.load(pi_ptr + bk * T + t, mask=t < T, other=0.0)
    M, Q = _membership_totals(w * w, pi, M_start_ptr, P_start_ptr, _carry_row(bk, chunk, CAUSAL), j, p, CAUSAL, CHUNK)
    _, dM, dQ = _grads_through_m(g, w, pi, M, Q)
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
    K,
    T,
    p,
    s_b,
    s_k,
    s_t,
    s_p,
    CAUSAL: tl.constexpr,
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
    M, Q = _membership_totals(w2, pi, M_start_ptr, P_start_ptr, row, j, p, CAUSAL, CHUNK)
    r, dM, dQ = _grads_through_m(g, w, pi, M, Q)
    RM = tl.load(RM_start_ptr + row * p + j, mask=j < p, other=0.0)[None, :]
    RQ = tl.load(RQ_start_ptr + row)
    if CAUSAL:
        RM = RM + tl.cumsum(dM, axis=0, reverse=True)
        RQ = RQ + tl.cumsum(dQ, axis=0, reverse=True)
    gpi = -tl.sum(g * r * w, axis=1) + tl.sum(RM * w2, axis=1) + RQ
    tl.store(gpi_ptr + bk * T + t, gpi, mask=t < T)


@triton.jit
def _energy_grad_sums_kernel(
    w_ptr,
    S_start_ptr,
    dlogits_ptr,
    dS_sums_ptr,
    eps,
    K,
    T,
    p,
    s_b,
    s_k,
    s_t,
    s_p,
    CAUSAL: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Per chunk, the sum over its tokens of dL/dS = -dL/dlogits w^2 / max(S, eps)^2 (where S >= eps)."""
    bk = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offsets, mask, t, j = _tile(bk, chunk, K, T, p, s_b, s_k, s_t, s_p, CHUNK, BLOCK_P)
    w = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    w2 = w * w
    S = _energy_totals(w2, S_start_ptr, _carry_row(bk, chunk, CAUSAL), j, p, CAUSAL)
    Sc = tl.maximum(S, eps)
    dlogits = tl.load(dlogits_ptr + bk * T + t, mask=t < T, other=0.0)
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
    eps,
    K,
    T,
    p,
    s_b,
    s_k,
    s_t,
    s_p,
    CAUSAL: tl.constexpr,
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
    S = _energy_totals(w2, S_start_ptr, row, j, p, CAUSAL)
    Sc = tl.maximum(S, eps)
    M, Q = _membership_totals(w2, pi, M_start_ptr, P_start_ptr, row, j, p, CAUSAL, CHUNK)
    r, dM, _ = _grads_through_m(g, w, pi, M, Q)
    RM = tl.load(RM_start_ptr + row * p + j, mask=j < p, other=0.0)[None, :]
    RS = tl.load(RS_start_ptr + row * p + j, mask=j < p, other=0.0)[None, :]
    if CAUSAL:
        RM = RM + tl.cumsum(dM, axis=0, reverse=True)
        dS = tl.where(S >= eps, -(dlogits[:, None] / Sc) * w2 / Sc, 0.0)
        RS = RS + tl.cumsum(dS, axis=0, reverse=True)
    dw = -g * pi[:, None] * r + 2 * w * (dlogits[:, None] / Sc + pi[:, None] * RM + RS)
    tl.store(dw_ptr + offsets, dw.to(dw_ptr.dtype.element_ty), mask=mask)


def _carries(sums: Tensor, causal: bool, *, reverse: bool = False) -> Tensor:
    """What each chunk starts from, given per-chunk sums (B, K, NC, ...): the sum over the chunks
    before it (after it, when reverse), or, non-causal, the total over all chunks (B, K, 1, ...)."""
    if not causal:
        return sums.sum(2, keepdim=True)
    carries = torch.zeros_like(sums)
    if reverse:
        carries[:, :, :-1] = sums[:, :, 1:].flip(2).cumsum(2).flip(2)
    else:
        carries[:, :, 1:] = sums[:, :, :-1].cumsum(2)
    return carries


def _layout(w: Tensor, chunk: int) -> tuple[tuple[int, int], tuple[int, ...], dict[str, int]]:
    """For w (B, K, T, p): the grid, the layout arguments that every kernel takes (K, T, p and the
    strides of w, c, grad_c and dw), and the tile sizes."""
    B, K, T, p = w.shape
    return (
        (B * K, triton.cdiv(T, chunk)),
        (K, T, p, *w.stride()),
        {"CHUNK": chunk, "BLOCK_P": triton.next_power_of_2(p)},
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
    w: Tensor, temp: Tensor, denom_bias: Tensor | None, causal: bool, eps: float, chunk: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(c, pi, logits, S, M, P at each chunk's start or their totals): the output and what backward keeps."""
    B, K, T, p = w.shape
    w, c = _dense_like(w)
    grid, dims, meta = _layout(w, chunk)
    f32 = {"dtype": torch.float32, "device": w.device}
    w2_sums = torch.empty(B, K, grid[1], p, **f32)
    _chunk_sums_kernel[grid](w, w, w2_sums, w2_sums, *dims, HAS_WEIGHT=False, **meta)
    S_start = _carries(w2_sums, causal)
    logits = torch.empty(B, K, T, **f32)
    has_bias = denom_bias is not None
    bias, bias_strides = (denom_bias, denom_bias.stride()) if has_bias else (w, (0, 0))  # w: a pointer never read
    _logits_kernel[grid](w, S_start, bias, logits, eps, *dims, *bias_strides, CAUSAL=causal, HAS_BIAS=has_bias, **meta)
    pi = (temp.float() * logits).softmax(dim=1)  # (B, K, T): over heads
    M_sums, P_sums = torch.empty_like(w2_sums), torch.empty(B, K, grid[1], **f32)
    _chunk_sums_kernel[grid](w, pi, M_sums, P_sums, *dims, HAS_WEIGHT=True, **meta)
    M_start, P_start = _carries(M_sums, causal), _carries(P_sums, causal)
    _output_kernel[grid](w, pi, M_start, P_start, c, *dims, CAUSAL=causal, **meta)
    return c, pi, logits, S_start, M_start, P_start


@_tssa_forward.register_fake
def _(w: Tensor, temp: Tensor, denom_bias: Tensor | None, causal: bool, eps: float, chunk: int) -> tuple[Tensor, ...]:
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
) -> tuple[Tensor, Tensor, Tensor]:
    """(dw, dtemp, dL/dlogits (B, K, T) fp32, from which the caller sums ddenom_bias)."""
    w, dw = _dense_like(w)
    if grad_c.stride() != dw.stride():
        grad_c = torch.empty_like(dw).copy_(grad_c)
    grid, dims, meta = _layout(w, chunk)
    B, K, _, p = w.shape
    dM_sums = torch.empty(B, K, grid[1], p, dtype=torch.float32, device=w.device)
    dQ_sums = torch.empty(B, K, grid[1], dtype=torch.float32, device=w.device)
    _membership_grad_sums_kernel[grid](w, grad_c, pi, M_start, P_start, dM_sums, dQ_sums, *dims, CAUSAL=causal, **meta)
    RM_start, RQ_start = _carries(dM_sums, causal, reverse=True), _carries(dQ_sums, causal, reverse=True)
    gpi = torch.empty_like(pi)
    _membership_grad_kernel[grid](
        w, grad_c, pi, M_start, P_start, RM_start, RQ_start, gpi, *dims, CAUSAL=causal, **meta
    )
    if grad_pi is not None:
        gpi += grad_pi
    dlogits, dtemp = membership_grad(gpi, pi, logits, temp.float())
    dtemp = dtemp.to(temp.dtype)
    dS_sums = torch.empty_like(dM_sums)
    _energy_grad_sums_kernel[grid](w, S_start, dlogits, dS_sums, eps, *dims, CAUSAL=causal, **meta)
    RS_start = _carries(dS_sums, causal, reverse=True)
    starts = (S_start, M_start, P_start, RM_start, RS_start)
    _input_grad_kernel[grid](w, grad_c, pi, dlogits, *starts, dw, eps, *dims, CAUSAL=causal, **meta)
    return dw, dtemp, dlogits


@_tssa_backward.register_fake
def _(grad_c: Tensor, grad_pi: Tensor | None, w: Tensor, temp: Tensor, pi: Tensor, *_: Any) -> tuple[Tensor, ...]:
    return torch.empty_like(w), torch.empty_like(temp), torch.empty_like(pi)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    w, temp, denom_bias, ctx.causal, ctx.eps, ctx.chunk = inputs
    ctx.save_for_backward(w, temp, *output[1:])
    ctx.bias_shape = None if denom_bias is None else (denom_bias.shape, denom_bias.dtype)


def _backward(ctx: Any, grad_c: Tensor | None, grad_pi: Tensor | None, *_: Any) -> tuple[Tensor | None, ...]:
    w, temp, *saved = ctx.saved_tensors
    if grad_c is None:
        grad_c = torch.zeros_like(w)
    dw, dtemp, dlogits = _tssa_backward(grad_c, grad_pi, w, temp, *saved, ctx.causal, ctx.eps, ctx.chunk)
    ddenom_bias = None
    if ctx.bias_shape is not None:
        (shape, dtype), (T, p) = ctx.bias_shape, w.shape[2:]
        ddenom_bias = torch.zeros(shape, dtype=dtype, device=w.device)
        ddenom_bias[:, :T] = p * dlogits.sum(0)
    return dw, dtemp, ddenom_bias, None, None, None


_tssa_forward.register_autograd(_backward, setup_context=_setup_context)


def token_statistics_triton(
    w: Tensor,
    temp: Tensor,
    *,
    causal: bool,
    denom_bias: Tensor | None = None,
    eps: float = ENERGY_EPS,
    chunk: int = CHUNK_TOKENS,
) -> tuple[Tensor, Tensor]:
    """`token_statistics` (pretrain/models/tssa.py) computed by the Triton kernels: w (B, K, T, p),
    temp (K, 1), denom_bias (K, >= T) or None -> (c in w's dtype, pi in fp32). chunk (tokens per
    program) must be a power of two."""
    if chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two, not {chunk}")
    if not w.is_cuda and not _INTERPRETED:
        raise RuntimeError(
            f"the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 from the start; w is on {w.device}"
        )
    c, pi, *_ = _tssa_forward(w, temp, denom_bias, causal, eps, chunk)
    return c, pi
