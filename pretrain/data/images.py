"""Image-classification shards: written once before training, decoded and augmented per sample.

A sample is an encoded image (`.jpg` or `.png`, kept as it came unless shrunk) and its label as an
ASCII integer (`.cls`), in webdataset tar shards with an `index.json` written last, like the text
shards. Pillow decodes and resamples (C code; the random crop and the resize are one
`resize(box=...)`, so only the output pixels are computed) and plain torch normalises:
torchvision's PyPI build does not import beside a CPU torch, and nothing here needs it.
Sections: the shard writer, the image sources (ImageFolder tree, CSV, scikit-learn's digits),
the run-time preparation of the embedded default, and decoding + augmentation.
"""

from __future__ import annotations

import csv
import io
import json
import math
import posixpath
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import fsspec
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm
from webdataset import TarWriter

from pretrain.data.augment import RandAugment, RandomErasing
from pretrain.data.storage import INDEX_NAME, KEY_PATTERN, SHARD_PATTERN, TAR_MTIME, build_once, url_to_fs
from pretrain.errors import UserError

INDEX_FORMAT = "image-classification"
INDEX_VERSION = 1
IMAGE_MEMBERS = ("jpg", "png")
LABEL_MEMBER = "cls"
PREPARE_HINT = "re-create the shards with `python tools/prepare_images.py`"

# Input files read as images; anything else in a tree (notes, .DS_Store) is not a sample.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Pillow's names for what is stored as .jpg (MPO: a camera's multi-picture JPEG, a valid JPEG).
JPEG_FORMATS = ("JPEG", "MPO")
JPEG_QUALITY = 95  # for a shrunk JPEG; Pillow's docs: above 95 adds bytes, hardly any quality
# Modes that resample as they are and that JPEG and PNG both store; others become RGB.
RESIZE_MODES = ("L", "RGB")

DIGITS_VERSION = 2  # bump when digits_samples changes, so older caches are not reused
DIGITS_SPLITS = ("train", "val")
DIGITS_VAL_EVERY = 6  # image i is held out for validation when i % 6 == 5: 299 of 1,797
DIGITS_MAX_VALUE = 16  # scikit-learn's digits pixels are 0..16

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

ImageSample = tuple[bytes, str, int]  # encoded image, member extension ('jpg' | 'png'), label
Transform = Callable[[Image.Image, torch.Generator | None], torch.Tensor]


# --------------------------------------------------------------------------- shard writer


def write_image_shards(
    samples: Iterable[ImageSample],
    output: str,
    samples_per_shard: int,
    classes: list[str],
    storage_options: dict | None = None,
    progress: bool = False,
    *,
    source: str = "",
) -> dict:
    """Write `(image bytes, 'jpg' | 'png', label)` samples as shards under the fsspec URL `output`.

    Keys number the samples in input order. Returns the index, which is written last.
    """
    if samples_per_shard < 1:
        raise UserError(f"samples_per_shard={samples_per_shard} must be >= 1")
    if not classes:
        raise UserError("the class list is empty: an image source must name at least one class")
    fs, root = url_to_fs(output, storage_options or {}, "output")
    index_path = f"{root.rstrip('/')}/{INDEX_NAME}"
    try:
        fs.makedirs(root, exist_ok=True)
        if fs.exists(index_path):  # an overwrite in progress must not look finished
            fs.rm(index_path)
        with (
            ShardSink(fs, root, samples_per_shard) as sink,
            tqdm(samples, desc="images", unit="img", disable=not progress, file=sys.stderr) as bar,
        ):
            for data, ext, label in bar:
                _check_sample(ext, label, len(classes), sink.total_samples)
                sink.write({ext: data, LABEL_MEMBER: str(label).encode("ascii")})
    except OSError as exc:
        raise UserError(
            f"cannot write shards to {output} ({type(exc).__name__}: {exc}): check the path and permissions"
        ) from None
    if not sink.shards:
        raise UserError(f"no images to write to {output}: the source gave none")
    index = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "classes": list(classes),
        "num_classes": len(classes),
        "shards": sink.shards,
        "total_samples": sink.total_samples,
        "source": source,
    }
    try:
        with fs.open(index_path, "w") as f:
            json.dump(index, f, indent=1)
    except OSError as exc:
        raise UserError(f"cannot write {output}/{INDEX_NAME} ({exc}): check the path and permissions") from None
    return index


def _check_sample(ext: str, label: int, num_classes: int, position: int) -> None:
    if ext not in IMAGE_MEMBERS:
        raise UserError(f"sample {position} has extension {ext!r}: images are stored as one of {IMAGE_MEMBERS}")
    if not 0 <= label < num_classes:
        raise UserError(f"sample {position} has label {label}, outside 0..{num_classes - 1} of the class list")


class ShardSink:
    """Writes samples ({member extension: bytes}) under numbered keys, a new tar every
    `samples_per_shard`. Knows nothing of what the bytes are, so any shard format can use it;
    the fixed member mtime makes the same samples give byte-identical shards."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, samples_per_shard: int) -> None:
        self.fs, self.root, self.samples_per_shard = fs, root.rstrip("/"), samples_per_shard
        self.shards: list[dict[str, Any]] = []
        self.total_samples = 0
        self._file: Any = None
        self._tar: TarWriter | None = None

    def write(self, members: dict[str, bytes]) -> None:
        if self._tar is None or self.shards[-1]["samples"] == self.samples_per_shard:
            self._open_next()
        self._tar.write({"__key__": KEY_PATTERN.format(self.total_samples), **members})
        self.shards[-1]["samples"] += 1
        self.total_samples += 1

    def _open_next(self) -> None:
        self._close_current()
        name = SHARD_PATTERN.format(len(self.shards))
        self._file = self.fs.open(f"{self.root}/{name}", "wb")
        self._tar = TarWriter(self._file, encoder=False, mtime=TAR_MTIME)
        self.shards.append({"name": name, "samples": 0})

    def _close_current(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._file.close()
            self._tar = self._file = None

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self._close_current()


# --------------------------------------------------------------------------- image sources


class ImageSource(NamedTuple):
    """An input, ready for `write_image_shards`: its class names and its samples."""

    classes: list[str]
    samples: Iterable[ImageSample]  # sized, so progress bars know the total
    description: str


class _EncodedFiles:
    """Image files read (and shrunk) lazily, one at a time, as the writer asks for them."""

    def __init__(
        self,
        files: list[tuple[str, int]],
        storage_options: dict,
        short_side: int | None,
        jpeg_quality: int,
    ) -> None:
        if short_side is not None and short_side < 1:
            raise UserError(f"short_side={short_side} (--short-side) must be >= 1")
        if not 1 <= jpeg_quality <= 100:
            raise UserError(f"jpeg_quality={jpeg_quality} (--jpeg-quality) must be in 1..100")
        self.files, self.storage_options = files, storage_options
        self.short_side, self.jpeg_quality = short_side, jpeg_quality

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[ImageSample]:
        for url, label in self.files:
            data = _read_bytes(url, self.storage_options)
            yield (*encode_for_shard(data, url, self.short_side, self.jpeg_quality), label)


def image_folder_samples(
    root: str,
    short_side: int | None = None,
    *,
    jpeg_quality: int = JPEG_QUALITY,
    storage_options: dict | None = None,
) -> ImageSource:
    """Samples of an ImageFolder tree `root/<class>/**/<image>` (a path or an fsspec URL).

    Classes are the sorted names of root's subdirectories, labelled 0.. in that order; files
    are taken in sorted path order. Hidden entries (`.ipynb_checkpoints`, macOS `._*` files) and
    files without an image suffix are not samples.
    """
    options = storage_options or {}
    fs, path = url_to_fs(root, options, "image folder")
    try:
        entries = fs.ls(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(f"image folder {root} does not exist: pass a directory of one subdirectory per class") from None
    except OSError as exc:
        raise UserError(f"cannot list image folder {root} ({exc}): check the path and permissions") from None
    class_dirs = sorted(
        (e["name"].rstrip("/") for e in entries if e["type"] == "directory" and not _hidden(e["name"])),
        key=posixpath.basename,
    )
    if not class_dirs:
        raise UserError(f"image folder {root} has no class subdirectories: put each class's images in root/<class>/")
    files: list[tuple[str, int]] = []
    for label, class_dir in enumerate(class_dirs):
        found = [p for p in sorted(fs.find(class_dir)) if _is_image_file(posixpath.relpath(p, class_dir))]
        if not found:
            raise UserError(
                f"class directory {_url(fs, class_dir)} holds no images ({', '.join(IMAGE_SUFFIXES)}): "
                "add some or remove it"
            )
        files.extend((_url(fs, p), label) for p in found)
    classes = [posixpath.basename(d) for d in class_dirs]
    samples = _EncodedFiles(files, options, short_side, jpeg_quality)
    return ImageSource(classes, samples, _describe("image folder", root, short_side))


def csv_samples(
    csv_path: str,
    short_side: int | None = None,
    *,
    jpeg_quality: int = JPEG_QUALITY,
    storage_options: dict | None = None,
) -> ImageSource:
    """Samples listed in a CSV: a header row, then rows whose first two columns are path, label.

    Relative paths are relative to the CSV's directory (on the CSV's filesystem). If every label
    is a non-negative integer, labels are kept as given and the classes are '0'..max (a class
    with no rows keeps its number); otherwise labels are class names, numbered in sorted order.
    """
    options = storage_options or {}
    fs, path = url_to_fs(csv_path, options, "CSV")
    try:
        text = fs.cat_file(path).decode("utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"CSV {csv_path} does not exist: pass a file of path,label rows") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read CSV {csv_path} as UTF-8 text ({exc}): fix or re-save it") from None
    paths, labels = _csv_rows(text, csv_path)
    base = posixpath.dirname(_url(fs, path))
    urls = [p if "://" in p else posixpath.join(base, p) for p in paths]
    classes, ids = _class_list(labels)
    samples = _EncodedFiles(list(zip(urls, ids, strict=True)), options, short_side, jpeg_quality)
    return ImageSource(classes, samples, _describe("CSV", csv_path, short_side))


def _csv_rows(text: str, csv_path: str) -> tuple[list[str], list[str]]:
    """(paths, labels) of the rows after the header; blank lines are skipped."""
    reader = csv.reader(io.StringIO(text))
    next(reader, None)
    paths, labels = [], []
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise UserError(f"CSV {csv_path} line {reader.line_num}: expected path,label, got {row!r}: fix the row")
        paths.append(row[0].strip())
        labels.append(row[1].strip())
    if not paths:
        raise UserError(f"CSV {csv_path} has no rows after its header: add path,label rows")
    return paths, labels


def _class_list(labels: list[str]) -> tuple[list[str], list[int]]:
    """Class names and each label's id, the same for the same labels in any row order."""
    if all(label.isdecimal() for label in labels):
        ids = [int(label) for label in labels]
        return [str(i) for i in range(max(ids) + 1)], ids
    classes = sorted(set(labels))
    number = {name: i for i, name in enumerate(classes)}
    return classes, [number[label] for label in labels]


def digits_samples(split: str | None = None) -> ImageSource:
    """scikit-learn's bundled digits (1797 8x8 images of 0..9), as grayscale (mode L) PNGs: all
    of them, or the `split` "train" (1,498) or "val" (every 6th, 299).

    Pixels 0..16 are scaled to 0..255 and rounded. Grayscale keeps the shards small;
    `decode_image` turns every image into RGB, so the models see three equal channels.
    """
    from sklearn.datasets import load_digits  # here: importing sklearn costs a second nobody else pays

    if split not in (None, *DIGITS_SPLITS):
        raise UserError(f"digits split {split!r} is not one of {', '.join(DIGITS_SPLITS)}")
    digits = load_digits()
    pixels = np.rint(digits.images * (255 / DIGITS_MAX_VALUE)).astype(np.uint8)
    held_out = [i % DIGITS_VAL_EVERY == DIGITS_VAL_EVERY - 1 for i in range(len(pixels))]
    samples = [
        (_encode(Image.fromarray(p), "PNG"), "png", int(t))
        for p, t, val in zip(pixels, digits.target, held_out, strict=True)
        if split is None or val == (split == "val")
    ]
    classes = [str(name) for name in digits.target_names]
    description = f"scikit-learn digits (8x8 grayscale, 0..16 scaled to 0..255), {split or 'all'}, v{DIGITS_VERSION}"
    return ImageSource(classes, samples, description)


def encode_for_shard(
    data: bytes, name: str, short_side: int | None, jpeg_quality: int = JPEG_QUALITY
) -> tuple[bytes, str]:
    """An input image's shard bytes and extension, after a full decode proves it readable.

    JPEG and PNG files are stored byte for byte; other formats become PNG (lossless). With
    `short_side`, an image whose shorter side is longer is shrunk to it (aspect kept) and
    re-encoded in its format; smaller images are kept as they are: enlarging adds bytes, not
    detail, and the training transforms resize anyway.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = image.format
            if short_side is not None and min(image.size) > short_side:
                return _reencode(_shrink(image, short_side), fmt, jpeg_quality)
            image.load()
            if fmt in JPEG_FORMATS:
                return data, "jpg"
            if fmt == "PNG":
                return data, "png"
            return _reencode(image, fmt, jpeg_quality)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot decode image {name} ({type(exc).__name__}: {exc}): fix or remove the file") from None


def _shrink(image: Image.Image, short_side: int) -> Image.Image:
    scale = short_side / min(image.size)
    size = (max(short_side, round(image.width * scale)), max(short_side, round(image.height * scale)))
    image.draft(None, size)  # JPEG: decode at 1/2..1/8 scale when that still covers `size`
    return _storable(image).resize(size, INTERPOLATION, reducing_gap=None)


def _reencode(image: Image.Image, fmt: str | None, jpeg_quality: int) -> tuple[bytes, str]:
    if fmt in JPEG_FORMATS:
        return _encode(_storable(image), "JPEG", quality=jpeg_quality), "jpg"
    return _encode(_storable(image), "PNG"), "png"


def _storable(image: Image.Image) -> Image.Image:
    """L or RGB: what resamples without a palette and saves as JPEG and PNG alike (alpha, which
    `decode_image` drops anyway, goes here already)."""
    return image if image.mode in RESIZE_MODES else image.convert("RGB")


def _encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def _read_bytes(url: str, storage_options: dict) -> bytes:
    try:
        with fsspec.open(url, "rb", **storage_options) as f:
            return f.read()
    except OSError as exc:
        raise UserError(f"cannot read image {url} ({type(exc).__name__}: {exc}): check that it exists") from None


def _url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path as the user can pass it back: plain for local files, with its protocol otherwise."""
    return path if "file" in fs.protocol else fs.unstrip_protocol(path)


def _hidden(path: str) -> bool:
    return posixpath.basename(path.rstrip("/")).startswith(".")


def _is_image_file(relative: str) -> bool:
    return relative.lower().endswith(IMAGE_SUFFIXES) and not any(part.startswith(".") for part in relative.split("/"))


def _describe(kind: str, where: str, short_side: int | None) -> str:
    return f"{kind} {where}" + (f", short side shrunk to <= {short_side} px" if short_side else "")


# --------------------------------------------------------------------------- embedded default


def prepare_digits(
    cache_dir: str,
    samples_per_shard: int,
    is_preparer: bool,
    wait_timeout_s: float = 600,
    *,
    split: str = "train",
    poll_interval_s: float = 0.5,
    progress: bool = False,
) -> str:
    """Local directory of the digits `split`'s shards, built once per cache and machine (`build_once`)."""
    final = Path(cache_dir).expanduser() / f"digits-v{DIGITS_VERSION}-{split}-{samples_per_shard}-per-shard"

    def build(directory: Path) -> None:
        source = digits_samples(split)
        write_image_shards(
            source.samples,
            str(directory),
            samples_per_shard,
            source.classes,
            progress=progress,
            source=source.description,
        )

    return build_once(final, build, is_preparer, wait_timeout_s, poll_interval_s)


# --------------------------------------------------------------------------- decoding + augmentation


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
