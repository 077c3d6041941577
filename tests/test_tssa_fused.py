"""The fused TSSA operator (pretrain/models/tssa_fused.py) against the eager reference: the output
and every gradient, in bf16, through torch.compile and activation checkpointing, in training;
and model.tssa_impl's dispatch."""

from __future__ import annotations

import pytest
import torch
from helpers import config, global_batches, train
from torch.utils.checkpoint import checkpoint

from pretrain.config import ModelConfig
from pretrain.errors import UserError
from pretrain.models import build_model
from pretrain.models.tost import TSSA, CausalTSSA, statistics_impl
from pretrain.models.tssa import token_statistics
from pretrain.models.tssa_fused import token_statistics_fused

B, K, p = 2, 3, 8


def inputs(T: int, dtype: torch.dtype, strided: bool, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """w (B, K, T, p), stored token-major as a layer's split_heads gives it when `strided`, with
    a coordinate that stays below the energy floor for three tokens and one that is always 0;
    temp (K, 1); denom_bias (K, T + 3)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(B, T, K, p, generator=g, dtype=dtype).transpose(1, 2)
    w = w if strided else w.contiguous()
    w[:, :, :3, 0] = 1e-7
    w[:, 1, :, 2] = 0
    temp = torch.rand(K, 1, generator=g, dtype=dtype) + 0.5
    denom_bias = torch.randn(K, T + 3, generator=g, dtype=dtype) * 0.3
    return w, temp, denom_bias


def outputs_and_grads(statistics, w, temp, denom_bias, causal: bool, **kwargs) -> list[torch.Tensor]:
    """c, pi and the gradients of w, temp (and denom_bias) of a loss that weighs both outputs."""
    leaves = [t.detach().requires_grad_() for t in (w, temp, denom_bias) if t is not None]
    c, pi = statistics(
        leaves[0], leaves[1], causal=causal, denom_bias=leaves[2] if denom_bias is not None else None, **kwargs
    )
    g = torch.Generator().manual_seed(1)
    loss = (c * torch.randn(c.shape, generator=g, dtype=c.dtype)).sum() + (pi.square() * pi.new_tensor(3.0)).sum()
    return [c.detach(), pi.detach(), *torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "non-causal"])
@pytest.mark.parametrize("T, chunk", [(37, 8), (5, 16), (32, 16)], ids=["ragged", "short", "whole"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)], ids=["fp32", "fp64"])
def test_output_and_every_gradient_equal_the_eager_reference(causal, T, chunk, dtype, tol) -> None:
    """With a positional prior, and (a whole chunk) without one, as vision's TSSA runs."""
    w, temp, denom_bias = inputs(T, dtype, strided=T != 32)
    denom_bias = None if T == 32 else denom_bias
    expected = outputs_and_grads(token_statistics, w, temp, denom_bias, causal)
    fused = outputs_and_grads(token_statistics_fused, w, temp, denom_bias, causal, chunk=chunk)
    names = ("c", "pi", "dw", "dtemp", "ddenom_bias")[: len(expected)]
    for name, got, want in zip(names, fused, expected, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        scale = want.abs().max().clamp_min(1)  # the masked coordinate's gradients are ~1e5
        torch.testing.assert_close(got / scale, want / scale, atol=tol, rtol=0, msg=name)
    if denom_bias is not None:
        assert torch.all(fused[4][:, T:] == 0)  # positions past the sequence get no gradient


def test_bf16_inputs_keep_fp32_statistics() -> None:
    """Statistics in fp32, rounded once: bitwise what fp32 inputs give, rounded; gradients in the
    inputs' dtypes."""
    w, temp, denom_bias = inputs(300, torch.float32, strided=True)
    w16 = w.bfloat16()
    c16, pi16, dw16, *_ = outputs_and_grads(token_statistics_fused, w16, temp, denom_bias, True, chunk=64)
    c32, pi32, *_ = outputs_and_grads(token_statistics_fused, w16.float(), temp, denom_bias, True, chunk=64)
    assert c16.dtype == dw16.dtype == torch.bfloat16 and pi16.dtype == torch.float32
    assert torch.equal(c16, c32.bfloat16()) and torch.equal(pi16, pi32)


def test_the_custom_op_passes_torchs_checks() -> None:
    """Schema, fake (meta) implementation, autograd registration and dynamic-shape tracing, as
    torch.compile, FSDP2 and DeepSpeed rely on them."""
    w, temp, denom_bias = inputs(11, torch.float32, strided=True)
    weight, bias = torch.randn(K * p, K * p), torch.randn(K * p)
    for causal in (True, False):
        for projection in ((None, None), (weight, bias)):  # c alone, or out_proj(c) fused in
            args = (w, temp.requires_grad_(), denom_bias, *projection, causal, 1e-12, 4)
            torch.library.opcheck(torch.ops.whitebox.tssa.default, args)


@pytest.mark.parametrize("layer_cls", [CausalTSSA, TSSA])
def test_a_layer_compiles_and_checkpoints_with_the_gradients_of_eager(layer_cls) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(n_head=4, n_embd=32, seq_len=40, tssa_impl="fused")
    layer = layer_cls(cfg)
    with torch.no_grad():
        layer.temp.uniform_(0.5, 2)
        if layer_cls is CausalTSSA:
            layer.denom_bias.normal_(0, 0.3)
    x = torch.randn(2, 40, 32)

    def grads(run) -> list[torch.Tensor]:
        layer.zero_grad(set_to_none=True)
        x_ = x.clone().requires_grad_()
        run(x_).square().sum().backward()
        return [x_.grad, *(p.grad for p in layer.parameters())]

    layer.tssa_impl = "eager"
    expected = grads(layer)
    layer.tssa_impl = "fused"
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    for run in (compiled, lambda x_: checkpoint(layer, x_, use_reentrant=False)):
        for got, want in zip(grads(run), expected, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_ten_fp32_training_steps_take_the_losses_of_eager(one_rank) -> None:
    blocks = global_batches(10, 4)
    losses = {
        impl: train(one_rank, config("tost_gpt2", ["engine=ddp", f"model.tssa_impl={impl}"], 4, 2), blocks)[1]
        for impl in ("eager", "fused")
    }
    assert losses["eager"][-1] < losses["eager"][0] - 0.5  # it learns, so agreement means something
    assert losses["fused"] == pytest.approx(losses["eager"], rel=1e-5, abs=1e-5)


def test_dispatch_and_its_one_line_refusals() -> None:
    cpu = torch.device("cpu")
    assert statistics_impl("auto", cpu) is token_statistics_fused
    assert statistics_impl("fused", cpu) is token_statistics_fused
    assert statistics_impl("eager", cpu) is token_statistics
    with pytest.raises(UserError, match=r"model\.tssa_impl='flash' is not one of auto, eager, fused, triton"):
        build_model(ModelConfig(tssa_impl="flash"))


def test_a_checkpoint_does_not_depend_on_the_implementation() -> None:
    """The same parameters under the same names whatever model.tssa_impl is: a fused model's state
    dict loads into an eager one (strictly) and gives its outputs."""
    models = {}
    for impl in ("fused", "eager"):
        torch.manual_seed(0)
        models[impl] = build_model(
            ModelConfig(name="tost", n_layer=2, n_head=4, n_embd=32, vocab_size=100, seq_len=24, tssa_impl=impl)
        )
    with torch.no_grad():
        for block in models["fused"].blocks:
            block.attn.denom_bias.normal_(0, 0.3)
    models["eager"].load_state_dict(models["fused"].state_dict(), strict=True)
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(models["eager"](ids), models["fused"](ids), atol=1e-5, rtol=1e-5)
