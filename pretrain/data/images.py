"""Image-classification shards at training time: their format, decoding and augmentation.

A sample is an encoded image (`.jpg` or `.png`) and its label as an ASCII integer (`.cls`);
`pretrain.prepare.images` writes them. Pillow decodes and resamples (C code; the random crop and
the resize are one `resize(box=...)`, so only the output pixels are computed) and plain torch
normalises: torchvision's PyPI build does not import beside a CPU torch, and nothing here needs it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from pretrain.data.augment import RandAugment, RandomErasing
from pretrain.errors import UserError

INDEX_FORMAT = "image-classification"
INDEX_VERSION = 1
IMAGE_MEMBERS = ("jpg", "png")
LABEL_MEMBER = "cls"
PREPARE_HINT = "re-create the shards with `python tools/prepare_images.py`"

# The augmentation of the vision recipes (DeiT / XCiT, which ToST and CRATE follow).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SIZE = 224
CROP_SCALE = (0.08, 1.0)  # fraction of the image area a random crop covers
CROP_RATIO = (3 / 4, 4 / 3)  # width / height of a random crop
CROP_ATTEMPTS = 10  # random boxes tried before falling back to a centre crop
FLIP_P = 0.5
EVAL_CROP_FRACTION = 0.875  # eval: short side to size / 0.875 (224 -> 256), centre crop size
INTERPOLATION = Image.Resampling.BICUBIC  # DeiT's and XCiT's choice, for train and eval

Transform = Callable[[Image.Image, torch.Generator | None], torch.Tensor]


def decode_image(data: bytes, name: str) -> Image.Image:
    """The RGB image in a shard member; `name` says which member in the error."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot decode image {name} ({type(exc).__name__}: {exc}): {PREPARE_HINT}") from None
    return image if image.mode == "RGB" else image.convert("RGB")


class _Normalize:
    """RGB image -> contiguous float32 (3, H, W) tensor of (pixel / 255 - mean) / std."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise UserError(f"mean={mean} and std={std} need 3 values each (R, G, B), std > 0")
        std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.scale = 1 / (255 * std_t)
        self.shift = -torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) / std_t

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # a writable copy: from_numpy needs one
        # HWC -> CHW in the float conversion's own pass, then two in-place passes (measured fastest)
        return pixels.to(torch.float32, memory_format=torch.contiguous_format).mul_(self.scale).add_(self.shift)


class TrainTransform:
    """Random-resized crop to `size` x `size`, horizontal flip, optionally a RandAugment policy,
    normalisation, optionally random erasing: training augmentation.

    The crop follows torchvision's RandomResizedCrop (area fraction in `scale`, log-uniform
    aspect ratio in `ratio`, `attempts` tries, then a centre crop) and is resampled straight
    from the source box by Pillow in one step. All randomness comes from `generator`, and every
    call draws the same number of values, so a generator seeded from (seed, sample index)
    gives that sample the same augmentation on every run, whatever came before it.
    """

    def __init__(
        self,
        size: int = IMAGE_SIZE,
        scale: tuple[float, float] = CROP_SCALE,
        ratio: tuple[float, float] = CROP_RATIO,
        flip_p: float = FLIP_P,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        interpolation: Image.Resampling = INTERPOLATION,
        attempts: int = CROP_ATTEMPTS,
        rand_augment: RandAugment | None = None,
        erasing: RandomErasing | None = None,
    ) -> None:
        if size < 1 or not 0 < scale[0] <= scale[1] <= 1 or not 0 < ratio[0] <= ratio[1]:
            raise UserError(
                f"TrainTransform size={size} scale={scale} ratio={ratio}: need size >= 1, "
                "0 < scale min <= max <= 1, 0 < ratio min <= max"
            )
        if not 0 <= flip_p <= 1 or attempts < 1:
            raise UserError(f"TrainTransform flip_p={flip_p} attempts={attempts}: need 0 <= flip_p <= 1, attempts >= 1")
        self.size, self.scale, self.flip_p = size, scale, flip_p
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.ratio, self.interpolation, self.attempts = ratio, interpolation, attempts
        self.normalize = _Normalize(mean, std)
        self.rand_augment, self.erasing = rand_augment, erasing

    @property
    def draws(self) -> int:
        """Uniforms taken from the generator per call: (area, ratio) per attempt, top, left, flip."""
        return 2 * self.attempts + 3

    def __call__(self, image: Image.Image, generator: torch.Generator) -> torch.Tensor:
        u = torch.rand(self.draws, generator=generator, dtype=torch.float64).tolist()
        box = self.crop_box(image.width, image.height, u[:-1])
        out = image.resize((self.size, self.size), self.interpolation, box=box, reducing_gap=None)
        if u[-1] < self.flip_p:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.rand_augment is not None:
            out = self.rand_augment(out, generator)
        tensor = self.normalize(out)
        return tensor if self.erasing is None else self.erasing(tensor, generator)

    def crop_box(self, width: int, height: int, u: list[float]) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the crop, from `draws - 1` uniforms in [0, 1)."""
        area = width * height
        for k in range(self.attempts):
            target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[2 * k])
            aspect = math.exp(self.log_ratio[0] + (self.log_ratio[1] - self.log_ratio[0]) * u[2 * k + 1])
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(u[-2] * (height - h + 1))
                left = int(u[-1] * (width - w + 1))
                return left, top, left + w, top + h
        return self._fallback_box(width, height)

    def _fallback_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """The largest centre crop whose aspect ratio is within `ratio`."""
        w, h = width, height
        if width / height < self.ratio[0]:
            h = round(width / self.ratio[0])
        elif width / height > self.ratio[1]:
            w = round(height * self.ratio[1])
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h


class EvalTransform:
    """Resize the short side to `resize` (default size / 0.875), centre crop `size`, normalise.

    Computed as one Pillow resample of the source box that maps onto the centre crop, with the
    crop placed on the resized image's pixel grid (as resize-then-crop places it), so only the
    output pixels are computed. Deterministic: the generator argument is accepted and unused.
    """

    def __init__(
        self,
        size: int = IMAGE_SIZE,
        resize: int | None = None,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        interpolation: Image.Resampling = INTERPOLATION,
    ) -> None:
        self.size = size
        self.resize = round(size / EVAL_CROP_FRACTION) if resize is None else resize
        if size < 1 or self.resize < size:
            raise UserError(f"EvalTransform size={size} resize={self.resize}: need 1 <= size <= resize")
        self.interpolation = interpolation
        self.normalize = _Normalize(mean, std)

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        box = self.crop_box(image.width, image.height)
        return self.normalize(image.resize((self.size, self.size), self.interpolation, box=box, reducing_gap=None))

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The centre crop of the resized image, in source pixels."""
        step = min(width, height) / self.resize  # source pixels per resized pixel
        left = round((width / step - self.size) / 2) * step
        top = round((height / step - self.size) / 2) * step
        return left, top, left + self.size * step, top + self.size * step


def check_image_index(index: dict) -> int:
    """The number of classes of an image shard set's index; a one-line error if it has none."""
    num_classes = index.get("num_classes")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"the {INDEX_FORMAT} index has no valid num_classes: {PREPARE_HINT}")
    return num_classes


class ImageDecoder:
    """The (sample, url, seed) decoder a shard stream calls for image shards: a webdataset
    sample ({'__key__', 'jpg' | 'png', 'cls'}) -> {'images': (3, S, S) float32, 'labels': int64
    scalar}. A bad or missing member, or a label outside the index's classes, is a one-line error
    naming shard and key. A class rather than a closure, so loader workers can pickle it."""

    def __init__(self, transform: Transform, num_classes: int) -> None:
        self.transform, self.num_classes = transform, num_classes

    def __call__(self, sample: dict, url: str, seed: int) -> dict[str, torch.Tensor]:
        key = sample.get("__key__")
        ext = next((e for e in IMAGE_MEMBERS if e in sample), None)
        if ext is None:
            raise UserError(f"sample {key} in shard {url} has no .jpg or .png member: {PREPARE_HINT}")
        if LABEL_MEMBER not in sample:
            raise UserError(f"sample {key} in shard {url} has no .{LABEL_MEMBER} member: {PREPARE_HINT}")
        label = self._label(sample[LABEL_MEMBER], f"{key}.{LABEL_MEMBER} in shard {url}")
        image = decode_image(sample[ext], f"{key}.{ext} in shard {url}")
        images = self.transform(image, torch.Generator().manual_seed(seed))
        return {"images": images, "labels": torch.tensor(label, dtype=torch.int64)}

    def _label(self, raw: bytes, name: str) -> int:
        text = raw.decode("ascii", errors="replace").strip()
        if not text.isdecimal() or int(text) >= self.num_classes:
            raise UserError(
                f"label {name} is {text[:20]!r}, not a class number 0..{self.num_classes - 1} "
                f"of the index: {PREPARE_HINT}"
            )
        return int(text)
