"""Image-classification shards, written once before training: image files (an ImageFolder tree
or a CSV of path,label rows, local or fsspec) and their labels.

A sample is an encoded image (`.jpg` or `.png`, kept byte for byte unless shrunk or in another
format) and its label as an ASCII integer (`.cls`). Encoding runs in parallel processes, in
input order, and the `ShardWriter` makes it resumable: every input file's URL, size and label
is in the fingerprint, and a re-run starts at the first unfinished shard without reading the
images of the finished ones.
"""

from __future__ import annotations

import csv
import functools
import io
import posixpath
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
from PIL import Image
from tqdm import tqdm

from pretrain.data.images import IMAGE_MEMBERS, INDEX_FORMAT, INDEX_VERSION, INTERPOLATION, LABEL_MEMBER
from pretrain.data.storage import url_to_fs
from pretrain.errors import UserError
from pretrain.prepare.parallel import ordered_map
from pretrain.prepare.writer import PrepareResult, ShardWriter, writing_to

# Input files read as images; anything else in a tree (notes, .DS_Store) is not a sample.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Pillow's names for what is stored as .jpg (MPO: a camera's multi-picture JPEG, a valid JPEG).
JPEG_FORMATS = ("JPEG", "MPO")
JPEG_QUALITY = 95  # for a shrunk JPEG; Pillow's docs: above 95 adds bytes, hardly any quality
# Modes that resample as they are and that JPEG and PNG both store; others become RGB.
RESIZE_MODES = ("L", "RGB")

ImageSample = tuple[bytes, str, int]  # encoded image, member extension ('jpg' | 'png'), label


@dataclass(frozen=True)
class ImageSource:
    """An input, ready for `prepare_image_shards`: one item per sample, in order, and the
    picklable factory of the function that encodes an item (built once per worker process)."""

    classes: list[str]
    items: Sequence[Any]
    make_encoder: Callable[[], Callable[[Any], ImageSample]]
    identity: Any  # JSON naming the inputs and encoding settings: with the classes, the fingerprint
    description: str

    def samples(self) -> Iterator[ImageSample]:
        """Every sample, encoded in this process."""
        return map(self.make_encoder(), self.items)


def prepare_image_shards(
    source: ImageSource,
    output: str,
    samples_per_shard: int,
    storage_options: dict | None = None,
    *,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = False,
) -> PrepareResult:
    """Write `source`'s samples as shards under the fsspec URL `output`, resumably; keys number
    the samples in input order. The shards are the same for any number of `workers`."""
    if not source.classes:
        raise UserError("the class list is empty: an image source must name at least one class")
    if workers < 1:
        raise UserError(f"workers={workers} (--workers) must be >= 1")
    config = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "inputs": source.identity, "classes": source.classes}
    with writing_to(output), ShardWriter(output, storage_options or {}, config, samples_per_shard) as writer:
        if (done := writer.begin(overwrite)) is not None:
            return PrepareResult(done, written=0, skipped=len(done["shards"]), already_done=True)
        writer.skip_finished()
        start = writer.resume_at
        samples = ordered_map(source.make_encoder, source.items[start:], workers)
        bar = tqdm(
            samples,
            desc="images",
            unit="img",
            initial=start,
            total=len(source.items),
            disable=not progress,
            file=sys.stderr,
        )
        with bar:
            for data, ext, label in bar:
                _check_sample(ext, label, len(source.classes), writer.total_samples)
                writer.write({ext: data, LABEL_MEMBER: str(label).encode("ascii")})
        if writer.total_samples == 0:
            raise UserError(f"no images to write to {output}: the source gave none")
        index = writer.finish(
            {
                "format": INDEX_FORMAT,
                "version": INDEX_VERSION,
                "classes": list(source.classes),
                "num_classes": len(source.classes),
                "source": source.description,
            }
        )
        return writer.result(index)


def _check_sample(ext: str, label: int, num_classes: int, position: int) -> None:
    if ext not in IMAGE_MEMBERS:
        raise UserError(f"sample {position} has extension {ext!r}: images are stored as one of {IMAGE_MEMBERS}")
    if not 0 <= label < num_classes:
        raise UserError(f"sample {position} has label {label}, outside 0..{num_classes - 1} of the class list")


# --------------------------------------------------------------------------- image files


@dataclass(frozen=True)
class FileEncoder:
    """(url, label) -> the file's shard sample: read, decoded in full, shrunk when asked."""

    storage_options: dict
    short_side: int | None
    jpeg_quality: int

    def __call__(self, item: tuple[str, int]) -> ImageSample:
        url, label = item
        return (
            *encode_for_shard(_read_bytes(url, self.storage_options), url, self.short_side, self.jpeg_quality),
            label,
        )


class Encoded:
    """The encoder of a source whose items are samples already (made in memory)."""

    def __call__(self, item: ImageSample) -> ImageSample:
        return item


def _file_source(
    classes: list[str],
    files: list[tuple[str, int]],
    sizes: list[int],
    options: dict,
    short_side: int | None,
    jpeg_quality: int,
    description: str,
) -> ImageSource:
    if short_side is not None and short_side < 1:
        raise UserError(f"short_side={short_side} (--short-side) must be >= 1")
    if not 1 <= jpeg_quality <= 100:
        raise UserError(f"jpeg_quality={jpeg_quality} (--jpeg-quality) must be in 1..100")
    identity = {
        "files": [[url, size, label] for (url, label), size in zip(files, sizes, strict=True)],
        "short_side": short_side,
        "jpeg_quality": jpeg_quality,
    }
    encoder = functools.partial(FileEncoder, options, short_side, jpeg_quality)
    return ImageSource(classes, files, encoder, identity, description)


def _sizes(urls: list[str], options: dict) -> list[int]:
    """Each file's size, for the fingerprint; a missing file is named here, before any shard."""
    sizes = []
    for url in urls:
        fs, path = url_to_fs(url, options, "image")
        try:
            sizes.append(fs.size(path))
        except OSError as exc:
            raise UserError(f"cannot read image {url} ({type(exc).__name__}: {exc}): check that it exists") from None
    return sizes


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
    sizes: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        found = fs.find(class_dir, detail=True)
        images = [p for p in sorted(found) if _is_image_file(posixpath.relpath(p, class_dir))]
        if not images:
            raise UserError(
                f"class directory {_url(fs, class_dir)} holds no images ({', '.join(IMAGE_SUFFIXES)}): "
                "add some or remove it"
            )
        files.extend((_url(fs, p), label) for p in images)
        sizes.extend(found[p]["size"] for p in images)
    classes = [posixpath.basename(d) for d in class_dirs]
    description = _describe("image folder", root, short_side)
    return _file_source(classes, files, sizes, options, short_side, jpeg_quality, description)


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
    description = _describe("CSV", csv_path, short_side)
    return _file_source(
        classes,
        list(zip(urls, ids, strict=True)),
        _sizes(urls, options),
        options,
        short_side,
        jpeg_quality,
        description,
    )


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
