"""RandAugment and random erasing: every operation works, and the draws are fixed per call."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from pretrain.data.augment import OPERATIONS, RandAugment, RandomErasing


def photo() -> Image.Image:
    g = torch.Generator().manual_seed(0)
    return Image.fromarray(torch.randint(0, 256, (24, 32, 3), generator=g, dtype=torch.uint8).numpy())


@pytest.mark.parametrize("name", list(OPERATIONS))
def test_every_operation_keeps_the_size_and_changes_the_image_at_full_magnitude(name):
    image = photo()
    out = OPERATIONS[name](image, 1.0, 0.2)
    assert out.size == image.size and out.mode == "RGB"
    assert out.tobytes() != image.tobytes()


def test_rand_augment_is_seeded_and_draws_the_same_count_whatever_it_applies():
    policy = RandAugment(ops=2, magnitude=9, magnitude_std=0.5, prob=0.5)
    a, b = (policy(photo(), torch.Generator().manual_seed(4)) for _ in range(2))
    assert a.tobytes() == b.tobytes()
    states = []
    for prob in (0.0, 1.0):
        g = torch.Generator().manual_seed(4)
        RandAugment(ops=2, magnitude=9, magnitude_std=0.5, prob=prob)(photo(), g)
        states.append(g.get_state())
    assert torch.equal(*states)


def test_random_erasing_replaces_one_box_of_2_to_33_percent_with_noise():
    image = torch.zeros(3, 40, 40)
    erased_fractions = []
    for seed in range(20):
        out = RandomErasing(prob=1.0)(image, torch.Generator().manual_seed(seed))
        changed = (out != 0).any(0)
        erased_fractions.append(changed.double().mean().item())
        rows, cols = changed.any(1).nonzero(), changed.any(0).nonzero()
        assert changed.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)  # one box
    assert all(0.015 < f < 0.34 for f in erased_fractions)
    g0, g1 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(RandomErasing(prob=0.0)(image, g0), image)
    RandomErasing(prob=1.0)(image, g1)
    assert torch.equal(g0.get_state(), g1.get_state())
