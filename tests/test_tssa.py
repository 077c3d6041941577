"""TSSA against docs/models.md: the worked example, the recurrent form, causality, and bf16."""

from __future__ import annotations

import pytest
import torch

from pretrain.config import ModelConfig
from pretrain.models.tost import CausalTSSA, causal_tssa, token_statistics, tssa
from pretrain.models.tssa import TSSAState, prefix_state, token_statistics_step

# The worked example of docs/models.md: K = 2 heads, N = 3 tokens, p = 2, temp = 1, denom_bias = 0.
W = torch.tensor(
    [[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], [[2.0, 1.0], [1.0, 0.0], [0.0, 1.0]]],
    dtype=torch.float64,
)[None]  # (B=1, K=2, N=3, p=2)
TEMP = torch.ones(2, 1, dtype=torch.float64)
ZERO_BIAS = torch.zeros(2, 3, dtype=torch.float64)

NON_CAUSAL = (
    [[0.310026, 0.645656, 0.549834], [0.689974, 0.354344, 0.450166]],
    [
        [[-0.197325, 0], [0, -0.419168], [-0.349959, -0.178480]],
        [[-0.447480, -0.391386], [-0.114904, 0], [0, -0.255356]],
    ],
)
CAUSAL = (
    [[0.268941, 0.689974, 0.549834], [0.731059, 0.310026, 0.450166]],
    [
        [[-0.134471, 0], [0, -0.355827], [-0.356414, -0.172163]],
        [[-0.292423, -0.365529], [-0.075494, 0], [0, -0.251194]],
    ],
)


@pytest.mark.parametrize("causal, expected", [(False, NON_CAUSAL), (True, CAUSAL)])
def test_worked_example(causal: bool, expected: tuple[list, list]) -> None:
    c, pi = token_statistics(W, TEMP, causal=causal, denom_bias=ZERO_BIAS if causal else None)
    pi_expected, c_expected = (torch.tensor(x, dtype=torch.float64) for x in expected)
    torch.testing.assert_close(pi[0], pi_expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(c[0], c_expected, atol=1e-5, rtol=0)
    public = causal_tssa(W, TEMP, ZERO_BIAS) if causal else tssa(W, TEMP)
    torch.testing.assert_close(public, c, atol=0, rtol=0)


def recurrent_tssa(w: torch.Tensor, temp: torch.Tensor, denom_bias: torch.Tensor) -> torch.Tensor:
    """The generation form of docs/models.md: per head keep S, M (p floats), P (1 float), token by token."""
    B, K, T, p = w.shape
    S = torch.zeros(B, K, p, dtype=w.dtype)
    M = torch.zeros(B, K, p, dtype=w.dtype)
    P = torch.zeros(B, K, 1, dtype=w.dtype)
    out = []
    for t in range(T):
        w_t = w[:, :, t]  # (B, K, p)
        S = S + w_t**2
        energy = (w_t**2 / S.clamp_min(1e-12)).sum(-1, keepdim=True)  # (B, K, 1)
        logits = temp * (energy + p * denom_bias[:, t : t + 1])
        pi = logits.softmax(dim=1)  # (B, K, 1)
        M = M + pi * w_t**2
        P = P + pi
        out.append(-pi * w_t / (1 + M / (P + 1e-8)))
    return torch.stack(out, dim=2)


def test_causal_equals_recurrent_form() -> None:
    torch.manual_seed(0)
    B, K, T, p, max_seq_len = 2, 3, 9, 4, 16
    w = torch.randn(B, K, T, p, dtype=torch.float64)
    temp = 1 + torch.rand(K, 1, dtype=torch.float64)
    denom_bias = torch.randn(K, max_seq_len, dtype=torch.float64)
    expected = recurrent_tssa(w, temp, denom_bias)
    torch.testing.assert_close(causal_tssa(w, temp, denom_bias), expected)


def test_the_state_after_a_parallel_prefix_equals_the_state_after_stepping_through_it() -> None:
    """prefix_state (what a Hugging Face export's prefill caches) against token_statistics_step, and
    the next token's output from either state."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 3, 9, 4, generator=g)  # (B, K, T, p)
    temp, denom_bias = torch.rand(3, 1, generator=g) + 0.5, torch.randn(3, 10, generator=g) * 0.1
    _, pi = token_statistics(w[:, :, :8], temp, causal=True, denom_bias=denom_bias)
    parallel = prefix_state(w[:, :, :8], pi)
    stepped = TSSAState(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(2, 3))
    for t in range(8):
        token_statistics_step(w[:, :, t], temp, denom_bias, stepped)
    assert parallel.t == stepped.t == 8
    for name in ("S", "M", "P"):
        torch.testing.assert_close(getattr(parallel, name), getattr(stepped, name), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        token_statistics_step(w[:, :, 8], temp, denom_bias, parallel),
        token_statistics(w, temp, causal=True, denom_bias=denom_bias)[0][:, :, 8],
        rtol=1e-5,
        atol=1e-6,
    )


def test_causal_memberships_equal_per_prefix_recomputation() -> None:
    """pi_t only sees tokens s <= t: it is the last token's pi of non-causal TSSA on w[:, :, :t+1].

    (c_t is not: its second moment weighs each earlier token by that token's own causal pi.)
    """
    torch.manual_seed(1)
    B, K, T, p = 2, 3, 7, 4
    w = torch.randn(B, K, T, p, dtype=torch.float64)
    temp = 1 + torch.rand(K, 1, dtype=torch.float64)
    zero_bias = torch.zeros(K, T, dtype=torch.float64)
    _, pi = token_statistics(w, temp, causal=True, denom_bias=zero_bias)
    for t in range(T):
        _, pi_prefix = token_statistics(w[:, :, : t + 1], temp, causal=False)
        torch.testing.assert_close(pi[:, :, t], pi_prefix[:, :, -1])


def test_no_information_from_the_future() -> None:
    torch.manual_seed(2)
    T, D = 6, 8
    layer = CausalTSSA(ModelConfig(n_head=2, n_embd=D, seq_len=T)).double()
    with torch.no_grad():
        layer.denom_bias.normal_()
    x = torch.randn(1, T, D, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    for t in range(T):
        (grad,) = torch.autograd.grad(y[0, t].sum(), x, retain_graph=True)
        assert torch.all(grad[0, t + 1 :] == 0), f"output {t} depends on a later input"
        assert torch.all(grad[0, : t + 1].abs().sum(-1) > 0), f"output {t} ignores an earlier input"


def test_statistics_in_fp32_under_bf16_autocast() -> None:
    torch.manual_seed(3)
    B, K, T, p = 2, 4, 1024, 8
    w = torch.randn(B, K, T, p).bfloat16()
    temp, denom_bias = torch.ones(K, 1), torch.zeros(K, T)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c = causal_tssa(w, temp, denom_bias)
    assert c.dtype == torch.bfloat16
    # Computed in fp32 and rounded once at the end: bitwise what the fp32 path gives.
    assert torch.equal(c, causal_tssa(w.float(), temp, denom_bias).bfloat16())


def test_bf16_autocast_layer_close_to_fp32() -> None:
    torch.manual_seed(4)
    layer = CausalTSSA(ModelConfig(n_head=4, n_embd=64, seq_len=128))
    x = torch.randn(2, 128, 64)
    y32 = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = layer(x)
    assert y16.dtype == torch.bfloat16
    assert (y16.float() - y32).abs().max() <= 0.02 * y32.abs().max()


@pytest.mark.gpu
def test_cuda_layer_in_bf16_is_close_to_the_cpu_layer_in_fp32() -> None:
    """The same causal TSSA layer on the GPU under bf16 autocast: its output is bf16 and within
    the tolerance the CPU's bf16 test allows, and the statistics stay finite over 1024 tokens."""
    torch.manual_seed(5)
    layer = CausalTSSA(ModelConfig(n_head=4, n_embd=64, seq_len=1024))
    x = torch.randn(2, 1024, 64)
    y32 = layer(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y16 = layer.cuda()(x.cuda())
    assert y16.dtype == torch.bfloat16 and torch.isfinite(y16).all()
    assert (y16.float().cpu() - y32).abs().max() <= 0.02 * y32.abs().max()
