"""Activation checkpointing: the same numbers, less memory held for backward."""

from __future__ import annotations

import pytest
import torch

from pretrain.config import EngineConfig, ModelConfig
from pretrain.engines.blocks import checkpointed_blocks, prepare_blocks
from pretrain.models import build_model

N_LAYER = 4


def forward_backward(name: str, mode: str) -> tuple[float, dict[str, torch.Tensor], int]:
    """Loss, gradients and the bytes autograd saved for backward outside recomputed blocks."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        name=name,
        n_layer=N_LAYER,
        n_head=4,
        n_embd=64,
        vocab_size=512,
        seq_len=64,
        layerscale_init=0.1 if name == "tost" else None,
    )
    model = prepare_blocks(
        build_model(cfg), EngineConfig(activation_checkpointing=mode, activation_checkpointing_every=2)
    )
    ids = torch.randint(0, cfg.vocab_size, (4, cfg.seq_len), generator=torch.Generator().manual_seed(1))
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, ids)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, saved


def test_which_blocks_are_checkpointed():
    def blocks(mode: str, k: int = 2) -> list[int]:
        return checkpointed_blocks(6, EngineConfig(activation_checkpointing=mode, activation_checkpointing_every=k))

    assert blocks("none") == [] and blocks("full") == [0, 1, 2, 3, 4, 5]
    assert blocks("every_k", 2) == [0, 2, 4] and blocks("every_k", 3) == [0, 3]


@pytest.mark.parametrize("name", ["tost", "gpt2"])
def test_checkpointing_changes_no_number_and_saves_less(name: str):
    loss, grads, saved = forward_backward(name, "none")
    results = {mode: forward_backward(name, mode) for mode in ("every_k", "full")}
    for mode, (ac_loss, ac_grads, _) in results.items():
        assert ac_loss == pytest.approx(loss, rel=1e-6), mode
        assert ac_grads.keys() == grads.keys()
        for n in grads:
            torch.testing.assert_close(
                ac_grads[n], grads[n], rtol=1e-6, atol=1e-9, msg=lambda m, where=f"{mode} {n}": f"{where}: {m}"
            )
    every_k, full = results["every_k"][2], results["full"][2]
    assert full < every_k < saved
    assert full < 0.6 * saved  # the blocks' activations dominate what backward keeps


@pytest.mark.slow
def test_compiled_blocks_compute_the_same_loss_and_gradients():
    """torch.compile of each block (inductor, CPU) on ToST, whose TSSA math is ours."""

    def run(engine: EngineConfig):
        torch.manual_seed(0)
        cfg = ModelConfig(name="tost", n_layer=2, n_head=4, n_embd=64, vocab_size=512, seq_len=32, layerscale_init=0.1)
        model = prepare_blocks(build_model(cfg), engine)
        ids = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=torch.Generator().manual_seed(1))
        loss = model(ids, ids)
        loss.backward()
        return loss.item(), [p.grad for p in model.parameters()]

    loss, grads = run(EngineConfig())
    compiled_loss, compiled_grads = run(EngineConfig(compile=True, activation_checkpointing="full"))
    assert compiled_loss == pytest.approx(loss, rel=1e-5)
    for g, ref in zip(compiled_grads, grads, strict=True):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-7)
