"""White-box measurements: the coding rate against a direct log-det and the bounds in docs/models.md, and
the per-layer probes on CRATE, ToST and ViT."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.config import load_config
from pretrain.models import build_model
from pretrain.models.layers import split_heads
from pretrain.whitebox import EPS2, Probe, coding_rate, membership_entropy, plot


def direct_rc(w: torch.Tensor) -> torch.Tensor:
    """1/2 sum_k logdet(I + p/(N eps2) W_k^T W_k) with torch.logdet, sample by sample."""
    B, K, N, p = w.shape
    out = torch.zeros(B, dtype=torch.float64)
    for b in range(B):
        for k in range(K):
            W = w[b, k].double()
            W = W / W.norm(dim=-1, keepdim=True)
            out[b] += 0.5 * torch.logdet(torch.eye(p, dtype=torch.float64) + p / (N * EPS2) * W.T @ W)
    return out


def test_coding_rate_equals_a_direct_logdet_and_meets_the_bounds():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 4, 16, 8, generator=g)
    assert torch.allclose(coding_rate(w), direct_rc(w), rtol=1e-10)
    d = 4 * 8
    assert (coding_rate(w) <= d / 2 * math.log(1 + 1 / EPS2)).all()  # unit rows, N >= p
    coinciding = torch.randn(1, 4, 1, 8, generator=g).expand(1, 4, 16, 8)  # every head's tokens alike
    assert coding_rate(coinciding).item() == pytest.approx(4 / 2 * math.log(1 + 8 / EPS2))


def test_membership_entropy_is_zero_for_one_head_and_ln_k_for_uniform():
    one_hot = torch.zeros(2, 4, 5)
    one_hot[:, 1] = 1
    assert membership_entropy(one_hot).item() == 0.0
    assert membership_entropy(torch.full((2, 4, 5), 0.25)).item() == pytest.approx(math.log(4))


def test_probes_measure_every_layer_of_crate_and_tost_and_nothing_of_vit(tmp_path):
    images = torch.randn(4, 3, 32, 32)
    crate = build_model(load_config(["model=crate_smoke"]).model).eval()
    seen_ista = []
    crate.blocks[1].ista.register_forward_hook(lambda m, a, out: seen_ista.append(out))
    inputs = []
    crate.blocks[0].attn.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    with torch.no_grad(), Probe(crate) as probe:
        crate(images)
    metrics = probe.metrics()
    assert sorted(metrics) == [f"{m}_layer{i:02d}" for m in ("rc_in", "rc_out", "sparsity") for i in (0, 1)]
    assert metrics["sparsity_layer01"] == (seen_ista[0] == 0).double().mean().item()
    block = crate.blocks[0]
    expected_in = coding_rate(split_heads(block.attn.U(inputs[0]), block.attn.n_head)).mean().item()
    assert metrics["rc_in_layer00"] == pytest.approx(expected_in)

    tost = build_model(load_config(["model=tost_vision_smoke"]).model).eval()
    with torch.no_grad(), Probe(tost) as probe:
        tost(images)
    entropies = [v for k, v in probe.metrics().items() if k.startswith("pi_entropy")]
    assert len(entropies) == 2 and all(0 < e <= math.log(4) for e in entropies)
    png = plot(probe.metrics(), "tost", str(tmp_path / "whitebox.png"))
    assert png and (tmp_path / "whitebox.png").read_bytes()[:4] == b"\x89PNG"

    vit = build_model(load_config(["model=vit_smoke"]).model).eval()
    with torch.no_grad(), Probe(vit) as probe:
        vit(images)
    assert probe.metrics() == {} and plot({}, "vit", str(tmp_path / "none.png")) is None
