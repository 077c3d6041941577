"""Mixup and CutMix: soft labels in the proportion of the mix, drawn from the micro-batch's index."""

from __future__ import annotations

import pytest
import torch

from pretrain.data.mixing import BatchMixer
from pretrain.errors import UserError


def batch() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"images": torch.rand(4, 3, 16, 16, generator=g) + 1, "labels": torch.tensor([0, 1, 2, 3])}


def test_mixup_blends_images_and_labels_by_the_same_weight():
    b = batch()
    out = BatchMixer(mixup_alpha=0.8, cutmix_alpha=0, prob=1, cutmix_switch_prob=0.5, num_classes=5, seed=1)(b, 7)
    lam = out["labels"][0, 0].item()  # sample 0 (class 0) is mixed with sample 3 (class 3)
    assert 0 < lam < 1 and out["labels"][0, 3].item() == pytest.approx(1 - lam)
    assert torch.allclose(out["labels"].sum(1), torch.ones(4))
    assert torch.allclose(out["images"], lam * b["images"] + (1 - lam) * b["images"].flip(0))


def test_cutmix_pastes_a_box_whose_area_is_the_partners_label_weight():
    b = batch()
    mixer = BatchMixer(mixup_alpha=0, cutmix_alpha=1.0, prob=1, cutmix_switch_prob=0.5, num_classes=4, seed=2)
    for index in range(20):
        out = mixer(b, index)
        pasted = (out["images"][0] == b["images"][3]).all(0).double().mean().item()  # pixels from the partner
        assert pasted == pytest.approx(out["labels"][0, 3].item())
        assert (out["images"][0] == b["images"][0]).all(0).double().mean().item() == pytest.approx(1 - pasted)


def test_draws_depend_only_on_the_seed_and_the_micro_batch_index():
    mixer = BatchMixer(0.8, 1.0, 1.0, 0.5, 4, seed=3)
    assert torch.equal(mixer(batch(), 5)["images"], mixer(batch(), 5)["images"])
    assert not torch.equal(mixer(batch(), 5)["images"], mixer(batch(), 6)["images"])
    assert not BatchMixer(0, 0, 1.0, 0.5, 4, seed=3).active
    with pytest.raises(UserError, match="mix_prob=1.5"):
        BatchMixer(0.8, 0, 1.5, 0.5, 4, seed=3)
