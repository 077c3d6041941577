"""RandAugment-style policies and random erasing for training images, in Pillow and torch.

Both take all randomness from the sample's generator and draw the same number of values on every
call, so a sample seeded from its place in the run is augmented alike on every run (see
TrainTransform). The operations and magnitude ranges follow the RandAugment paper's list (Cubuk
et al., 2020) with "increasing" magnitudes, as timm's rand-m9-mstd0.5-inc1 used by DeiT and XCiT.
"""

from __future__ import annotations

import math

import torch
from PIL import Image, ImageEnhance, ImageOps

from pretrain.errors import UserError

FILL = (128, 128, 128)  # what geometric operations leave where the image was


def _signed(magnitude: float, sign: float) -> float:
    return magnitude if sign < 0.5 else -magnitude


# name -> op(image, magnitude in [0, 1], sign uniform)
OPERATIONS = {
    "auto_contrast": lambda im, m, s: ImageOps.autocontrast(im),
    "equalize": lambda im, m, s: ImageOps.equalize(im),
    "invert": lambda im, m, s: ImageOps.invert(im),
    "rotate": lambda im, m, s: im.rotate(_signed(30 * m, s), fillcolor=FILL),
    "posterize": lambda im, m, s: ImageOps.posterize(im, max(1, 8 - int(4 * m))),
    "solarize": lambda im, m, s: ImageOps.solarize(im, int(256 - 256 * m)),
    "color": lambda im, m, s: ImageEnhance.Color(im).enhance(1 + _signed(0.9 * m, s)),
    "contrast": lambda im, m, s: ImageEnhance.Contrast(im).enhance(1 + _signed(0.9 * m, s)),
    "brightness": lambda im, m, s: ImageEnhance.Brightness(im).enhance(1 + _signed(0.9 * m, s)),
    "sharpness": lambda im, m, s: ImageEnhance.Sharpness(im).enhance(1 + _signed(0.9 * m, s)),
    "shear_x": lambda im, m, s: im.transform(
        im.size, Image.Transform.AFFINE, (1, _signed(0.3 * m, s), 0, 0, 1, 0), fillcolor=FILL
    ),
    "shear_y": lambda im, m, s: im.transform(
        im.size, Image.Transform.AFFINE, (1, 0, 0, _signed(0.3 * m, s), 1, 0), fillcolor=FILL
    ),
    "translate_x": lambda im, m, s: im.transform(
        im.size, Image.Transform.AFFINE, (1, 0, _signed(0.45 * m, s) * im.width, 0, 1, 0), fillcolor=FILL
    ),
    "translate_y": lambda im, m, s: im.transform(
        im.size, Image.Transform.AFFINE, (1, 0, 0, 0, 1, _signed(0.45 * m, s) * im.height), fillcolor=FILL
    ),
}


class RandAugment:
    """`ops` operations drawn uniformly from OPERATIONS, each applied with probability `prob` at
    magnitude (`magnitude` + N(0, `magnitude_std`)) / 10, clipped to [0, 1]."""

    def __init__(self, ops: int, magnitude: float, magnitude_std: float, prob: float) -> None:
        if ops < 0 or not 0 <= magnitude <= 10 or magnitude_std < 0 or not 0 <= prob <= 1:
            raise UserError(
                f"data.image RandAugment: rand_augment_ops={ops} >= 0, 0 <= magnitude={magnitude} <= 10, "
                f"magnitude_std={magnitude_std} >= 0 and 0 <= prob={prob} <= 1 are needed"
            )
        self.ops, self.magnitude, self.magnitude_std, self.prob = ops, magnitude, magnitude_std, prob
        self.names = list(OPERATIONS)

    def __call__(self, image: Image.Image, generator: torch.Generator) -> Image.Image:
        u = torch.rand(3 * self.ops, generator=generator, dtype=torch.float64).tolist()
        noise = torch.randn(self.ops, generator=generator, dtype=torch.float64).tolist()
        for i in range(self.ops):
            pick, apply, sign = u[3 * i : 3 * i + 3]
            if apply < self.prob:
                m = min(1.0, max(0.0, (self.magnitude + self.magnitude_std * noise[i]) / 10))
                image = OPERATIONS[self.names[int(pick * len(self.names))]](image, m, sign)
        return image


class RandomErasing:
    """With probability `prob`, replace a box of 2%-33% of the (normalised) image, aspect ratio
    log-uniform in [0.3, 3.3], with standard normal noise (Zhong et al., 2020; timm's pixel mode)."""

    AREA, LOG_RATIO, ATTEMPTS = (0.02, 1 / 3), (math.log(0.3), math.log(1 / 0.3)), 10

    def __init__(self, prob: float) -> None:
        if not 0 <= prob <= 1:
            raise UserError(f"data.image.erase_prob={prob} must be in [0, 1]")
        self.prob = prob

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        u = torch.rand(2 + 4 * self.ATTEMPTS, generator=generator, dtype=torch.float64).tolist()
        if u[0] >= self.prob:
            return image
        _, H, W = image.shape
        for k in range(self.ATTEMPTS):
            a_u, r_u, top_u, left_u = u[2 + 4 * k : 6 + 4 * k]
            area = H * W * (self.AREA[0] + (self.AREA[1] - self.AREA[0]) * a_u)
            ratio = math.exp(self.LOG_RATIO[0] + (self.LOG_RATIO[1] - self.LOG_RATIO[0]) * r_u)
            h, w = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < h < H and 0 < w < W:
                top, left = int(top_u * (H - h + 1)), int(left_u * (W - w + 1))
                noise = torch.Generator().manual_seed(int(u[1] * 2**62))  # a fixed count of draws above
                image = image.clone()
                image[:, top : top + h, left : left + w] = torch.randn(image.shape[0], h, w, generator=noise)
                return image
        return image
