"""The Triton TSSA kernels (pretrain/models/tssa_triton.py) against the eager reference: outputs
and gradients, causal and not, tails and short sequences, bf16, and the custom ops' fake
implementations. Without CUDA they run on CPU in Triton's interpreter."""

from __future__ import annotations

import importlib

import pytest
import torch

from pretrain.models.tssa import ENERGY_EPS, token_statistics

triton = pytest.importorskip("triton")
tssa_triton = importlib.import_module("pretrain.models.tssa_triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Without CUDA the kernels run in Triton's interpreter, which conftest.py turns on (TRITON_INTERPRET=1)
# before anything imports triton.
runs_here = pytest.mark.skipif(
    DEVICE == "cpu" and not tssa_triton._INTERPRETED,
    reason="no CUDA, and triton was imported before TRITON_INTERPRET=1 was set (tests/conftest.py sets it)",
)

CHUNK = 16  # small, so that T = 37 spans three chunks with a tail


def inputs(T: int, p: int, *, bias: bool, model_layout: bool, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """w (B=2, K=3, T, p) (the model's view of (B, T, K, p) memory, or contiguous), temp (K, 1),
    denom_bias (K, T + 7) or None, and random weights for a loss on c and on pi. Coordinate 0
    is small over the first CHUNK + 2 tokens, so that its energy S stays below an eps of 1 past the
    first chunk (and in total, when T is shorter)."""
    g = torch.Generator().manual_seed(seed)
    B, K = 2, 3
    w = torch.randn(B, T, K, p, generator=g).transpose(1, 2) if model_layout else torch.randn(B, K, T, p, generator=g)
    w[:, :, : CHUNK + 2, 0] *= 0.1
    temp = 0.5 + torch.rand(K, 1, generator=g)
    denom_bias = torch.randn(K, T + 7, generator=g) * 0.3 if bias else None
    tensors = w, temp, denom_bias, torch.randn(B, K, T, p, generator=g), torch.randn(B, K, T, generator=g)
    return tuple(None if x is None else x.to(DEVICE) for x in tensors)


def outputs_and_grads(fn, w, temp, denom_bias, grad_c, grad_pi, *, causal: bool, **kwargs) -> list[torch.Tensor]:
    """[c, pi, dw, dtemp(, ddenom_bias)] of the loss (c * grad_c).sum() + (pi * grad_pi).sum(), or
    of (c * grad_c).sum() alone when grad_pi is None."""
    leaves = [x.detach().requires_grad_() for x in (w, temp, denom_bias) if x is not None]
    c, pi = fn(leaves[0], leaves[1], causal=causal, denom_bias=leaves[2] if len(leaves) == 3 else None, **kwargs)
    loss = (c * grad_c).sum() + (0 if grad_pi is None else (pi * grad_pi).sum())
    return [c, pi, *torch.autograd.grad(loss, leaves)]


# (T, p, denom_bias, the model's strided layout, eps): T a whole chunk, a tail past three chunks,
# shorter than a chunk; p a power of two and not. An eps of 1 puts small energies below it (S < eps
# has no gradient), without the 1 / eps^2 of a tiny eps, which fp32 cannot follow.
CASES = [(37, 16, True, True, 1.0), (CHUNK, 12, False, False, ENERGY_EPS), (5, 16, True, False, 1.0)]


@runs_here
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "non-causal"])
@pytest.mark.parametrize("T, p, bias, model_layout, eps", CASES)
def test_outputs_and_gradients_equal_the_reference(
    T: int, p: int, bias: bool, model_layout: bool, eps: float, causal: bool
) -> None:
    """fp32 kernels against fp64 autograd of token_statistics: each rounding of theirs is fp32's."""
    w, temp, denom_bias, grad_c, grad_pi = inputs(T, p, bias=bias, model_layout=model_layout)
    got = outputs_and_grads(
        tssa_triton.token_statistics_triton, w, temp, denom_bias, grad_c, grad_pi, causal=causal, eps=eps, chunk=CHUNK
    )
    as64 = [None if x is None else x.double() for x in (w, temp, denom_bias, grad_c, grad_pi)]
    expected = outputs_and_grads(token_statistics, *as64, causal=causal, eps=eps)
    names = ["c", "pi", "dw", "dtemp", "ddenom_bias"][: len(expected)]
    for name, x, ref in zip(names, got, expected, strict=True):
        assert x.dtype == torch.float32, name
        torch.testing.assert_close(x, ref.float(), atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@runs_here
def test_bf16_inputs_give_bf16_outputs_close_to_fp32() -> None:
    """bf16 w (the model's autocast) with fp32 parameters: c and dw in bf16, close to the fp32
    reference on the same bf16 values; pi in fp32. The loss uses c only (pi's gradient is unused)."""
    w, temp, denom_bias, grad_c, _ = inputs(37, 16, bias=True, model_layout=True)
    w = w.bfloat16()
    got = outputs_and_grads(
        tssa_triton.token_statistics_triton, w, temp, denom_bias, grad_c, None, causal=True, chunk=CHUNK
    )
    expected = outputs_and_grads(token_statistics, w.float(), temp, denom_bias, grad_c, None, causal=True)
    assert [x.dtype for x in got] == [torch.bfloat16, torch.float32, torch.bfloat16, torch.float32, torch.float32]
    for x, ref in zip(got, expected, strict=True):
        torch.testing.assert_close(x.float(), ref, atol=2e-2, rtol=2e-2)


@runs_here
def test_fake_implementations_agree_with_the_kernels() -> None:
    """opcheck of both ops: the schema, the autograd registration, and fake tensors' shapes, dtypes
    and strides against the real ops' (what torch.compile and FSDP2 trace with)."""
    w, temp, denom_bias, grad_c, grad_pi = inputs(5, 12, bias=True, model_layout=True)
    forward_args = (w.requires_grad_(), temp.requires_grad_(), denom_bias.requires_grad_(), True, ENERGY_EPS, CHUNK)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.whitebox.tssa_triton.default, forward_args, test_utils=tests)
    with torch.no_grad():
        _, pi, logits, *starts = torch.ops.whitebox.tssa_triton(*forward_args)
    backward_args = (grad_c, grad_pi, w, temp, pi, logits, *starts, True, ENERGY_EPS, CHUNK)
    torch.library.opcheck(torch.ops.whitebox.tssa_triton_backward.default, backward_args, test_utils=tests)


@pytest.mark.slow  # a whole model in Triton's interpreter; the kernels' own tests stay in the fast part
@runs_here
def test_a_model_with_tssa_impl_triton_takes_the_steps_of_eager() -> None:
    """model.tssa_impl=triton through the layers (TSSAOutput's unfused path): a ToST LM's loss and
    every parameter's gradient equal eager's."""
    from pretrain.config import ModelConfig
    from pretrain.models import build_model

    ids = torch.randint(0, 100, (2, 40), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    results = {}
    for impl in ("eager", "triton"):
        torch.manual_seed(0)
        cfg = ModelConfig(name="tost", n_layer=2, n_head=4, n_embd=32, vocab_size=100, seq_len=48, tssa_impl=impl)
        model = build_model(cfg).to(DEVICE)
        loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        results[impl] = [loss.detach(), *(p.grad for p in model.parameters())]
    for got, want in zip(results["triton"], results["eager"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_triton_where_it_cannot_run_is_refused_in_one_line(monkeypatch) -> None:
    """As on a machine without CUDA whose triton is not interpreted: a UserError naming the key."""
    from pretrain.errors import UserError
    from pretrain.models.tost import resolve_impl

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(tssa_triton, "_INTERPRETED", False)
    with pytest.raises(UserError, match=r"^model\.tssa_impl=triton needs CUDA[^\n]*$"):
        resolve_impl("triton", torch.device("cpu"))
    assert resolve_impl("auto", torch.device("cpu")) == "fused"
