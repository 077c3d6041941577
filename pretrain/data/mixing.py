"""Mixup and CutMix: each training micro-batch of images mixed with itself reversed, with soft
labels in proportion. The random draws come from (seed, the micro-batch's index in the run), so
a resumed or resharded run mixes every batch exactly as an unbroken one."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from pretrain.batch import Batch
from pretrain.errors import UserError


class BatchMixer:
    """With probability `prob`, CutMix (probability `cutmix_switch_prob` when both are on) or
    Mixup, the mixing weight drawn from Beta(alpha, alpha); labels become (B, classes) mixtures."""

    def __init__(
        self,
        mixup_alpha: float,
        cutmix_alpha: float,
        prob: float,
        cutmix_switch_prob: float,
        num_classes: int,
        seed: int,
    ) -> None:
        if mixup_alpha < 0 or cutmix_alpha < 0 or not 0 <= prob <= 1 or not 0 <= cutmix_switch_prob <= 1:
            raise UserError(
                f"data.image mixing: mixup_alpha={mixup_alpha} and cutmix_alpha={cutmix_alpha} must be "
                f">= 0, mix_prob={prob} and cutmix_switch_prob={cutmix_switch_prob} in [0, 1]"
            )
        self.mixup_alpha, self.cutmix_alpha, self.prob = mixup_alpha, cutmix_alpha, prob
        self.switch_prob, self.num_classes, self.seed = cutmix_switch_prob, num_classes, seed

    @property
    def active(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def __call__(self, batch: Batch, index: int) -> Batch:
        """Micro-batch number `index` of the run, mixed (or only given one-hot labels)."""
        rng = np.random.default_rng([self.seed, index])
        images, labels = batch["images"], F.one_hot(batch["labels"], self.num_classes).float()
        if rng.random() >= self.prob:
            return {"images": images, "labels": labels}
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or rng.random() < self.switch_prob)
        lam = float(rng.beta(*(2 * [self.cutmix_alpha if use_cutmix else self.mixup_alpha])))
        partner = images.flip(0)
        if use_cutmix:
            images, lam = _paste_box(images, partner, lam, rng)
        else:
            images = lam * images + (1 - lam) * partner
        return {"images": images, "labels": lam * labels + (1 - lam) * labels.flip(0)}


def _paste_box(
    images: torch.Tensor, partner: torch.Tensor, lam: float, rng: np.random.Generator
) -> tuple[torch.Tensor, float]:
    """Paste a box of about (1 - lam) of the area from `partner`, centred uniformly (clipped at
    the border); returns the images and lam corrected to the area actually kept."""
    H, W = images.shape[-2:]
    cut = math.sqrt(1 - lam)
    h, w = int(H * cut), int(W * cut)
    cy, cx = int(rng.integers(H)), int(rng.integers(W))
    top, bottom = max(cy - h // 2, 0), min(cy + h // 2, H)
    left, right = max(cx - w // 2, 0), min(cx + w // 2, W)
    mixed = images.clone()
    mixed[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
    return mixed, 1 - (bottom - top) * (right - left) / (H * W)
