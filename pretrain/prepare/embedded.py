"""The embedded defaults, which need no user data and no network: the installed Python
standard library as a text corpus, and scikit-learn's bundled digits as an image set. Each is
prepared once per cache directory and machine (`build_once`) when a run asks for it."""

from __future__ import annotations

import ast
import io
import os
import random
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from pretrain.data.storage import build_once
from pretrain.data.tokenizer import GPT2_NAME
from pretrain.errors import UserError
from pretrain.prepare.images import ImageSample, ImageSource, prepare_image_shards
from pretrain.prepare.text import write_token_shards

# Bump when the stdlib corpus changes, so caches built by older code are not reused.
STDLIB_CORPUS_VERSION = 4  # 4: the index records the tokenizer's identity
STDLIB_SPLITS = ("train", "val")
STDLIB_VAL_EVERY = 20  # after the shuffle, document i is held out for validation when i % 20 == 19
STDLIB_SHUFFLE_SEED = 0  # fixed: the embedded corpus is the same on every machine and run
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"})

DIGITS_VERSION = 2  # bump when digits_samples changes, so older caches are not reused
DIGITS_SPLITS = ("train", "val")
DIGITS_VAL_EVERY = 6  # image i is held out for validation when i % 6 == 5: 299 of 1,797
DIGITS_MAX_VALUE = 16  # scikit-learn's digits pixels are 0..16


# --------------------------------------------------------------------------- the stdlib corpus


def stdlib_documents(max_bytes: int) -> Iterator[str]:
    """The embedded default corpus: the installed standard library, about `max_bytes` of UTF-8.

    English first: pass one yields each module's docstrings (module, classes, functions, in
    source order, one document per file); pass two yields the files' source text. Files are
    sorted by path, so a given Python install always gives the same text. The last document is
    cut so that exactly `min(max_bytes, available)` bytes are yielded.
    """
    if max_bytes < 1:
        raise UserError(f"stdlib corpus size {max_bytes} bytes: set data.stdlib_max_mb / --stdlib-mb above 0")
    files = _stdlib_files()
    budget = max_bytes
    for extract in (_docstrings, _source):
        for path in files:
            text = extract(path)
            if not text:
                continue
            data = text.encode("utf-8")
            if len(data) >= budget:
                yield data[:budget].decode("utf-8", errors="ignore")
                return
            budget -= len(data)
            yield text


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP_DIRS]
        files.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _parse(path: Path) -> tuple[str, ast.Module] | None:
    """Source and tree, or None for a file that does not read or parse (skipped, not fatal)."""
    try:
        source = path.read_text(encoding="utf-8")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # old escapes in stdlib strings warn on parse
            return source, ast.parse(source, filename=str(path))
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return None


def _docstrings(path: Path) -> str:
    parsed = _parse(path)
    if parsed is None:
        return ""
    docs: list[str] = []
    _collect_docstrings(parsed[1], docs)
    return "\n\n".join(docs)


def _collect_docstrings(node: ast.AST, out: list[str]) -> None:
    """Depth-first, so docstrings keep the order they have in the file."""
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node)
        if doc:
            out.append(doc)
    for child in ast.iter_child_nodes(node):
        _collect_docstrings(child, out)


def _source(path: Path) -> str:
    parsed = _parse(path)
    return parsed[0] if parsed else ""


def stdlib_corpus_name(block_len: int, max_bytes: int, tokenizer_name: str = GPT2_NAME, split: str = "train") -> str:
    """Everything that changes the shards is in the name, so a stale cache is never reused."""
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    return f"stdlib-py{py}-v{STDLIB_CORPUS_VERSION}-{split}-{tokenizer_name}-b{block_len}-{max_bytes}B"


def prepare_stdlib_corpus(
    cache_dir: str,
    block_len: int,
    blocks_per_shard: int,
    max_bytes: int,
    is_preparer: bool,
    wait_timeout_s: float = 600,
    *,
    split: str = "train",
    poll_interval_s: float = 0.5,
    progress: bool = False,
) -> str:
    """Local directory of the stdlib corpus's `split` shards ("train", or "val": every 20th
    document), built once per cache and machine (`build_once`)."""
    if split not in STDLIB_SPLITS:
        raise UserError(f"stdlib corpus split {split!r} is not one of {', '.join(STDLIB_SPLITS)}")
    final = Path(cache_dir).expanduser() / stdlib_corpus_name(block_len, max_bytes, split=split)

    def build(directory: Path) -> None:
        documents = list(stdlib_documents(max_bytes))
        # stdlib_documents gives all docstrings, then all source: shuffled, every shard mixes
        # both, so the loss does not jump with the shard a rank happens to be reading.
        random.Random(STDLIB_SHUFFLE_SEED).shuffle(documents)
        held_out = [i % STDLIB_VAL_EVERY == STDLIB_VAL_EVERY - 1 for i in range(len(documents))]
        documents = [d for d, val in zip(documents, held_out, strict=True) if val == (split == "val")]
        write_token_shards(
            documents,
            str(directory),
            block_len,
            blocks_per_shard,
            source=f"python {sys.version.split()[0]} stdlib at {sysconfig.get_paths()['stdlib']}: "
            f"docstrings and source text, documents shuffled (seed {STDLIB_SHUFFLE_SEED}); {max_bytes} bytes; "
            f"{split} split",
            progress=progress,
        )

    return build_once(final, build, is_preparer, wait_timeout_s, poll_interval_s)


# --------------------------------------------------------------------------- the digits


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
    items = [
        (p, int(t))
        for p, t, val in zip(pixels, digits.target, held_out, strict=True)
        if split is None or val == (split == "val")
    ]
    classes = [str(name) for name in digits.target_names]
    description = f"scikit-learn digits (8x8 grayscale, 0..16 scaled to 0..255), {split or 'all'}, v{DIGITS_VERSION}"
    return ImageSource(classes, items, PngEncoder, description, description)


class PngEncoder:
    """(grayscale pixels, label) -> a PNG sample."""

    def __call__(self, item: tuple[np.ndarray, int]) -> ImageSample:
        pixels, label = item
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        return buf.getvalue(), "png", label


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
        prepare_image_shards(digits_samples(split), str(directory), samples_per_shard, progress=progress)

    return build_once(final, build, is_preparer, wait_timeout_s, poll_interval_s)
