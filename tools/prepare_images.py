"""Write images and labels as webdataset image-classification shards for training.

    python tools/prepare_images.py --image-folder train/ --output s3://bucket/imagenet/train --short-side 256
    python tools/prepare_images.py --csv labels.csv --output data/pets --samples-per-shard 500 --workers 8
    python tools/prepare_images.py --digits --output data/digits

--image-folder: root/<class>/**/<image>, classes in sorted order. --csv: a header row, then
path,label rows (paths relative to the CSV). --digits: scikit-learn's bundled digits, the
embedded default. Re-running the same command resumes an interrupted run: finished shards are
kept, and their images not read again. Train on the result with
'data.urls="<output>/shard-{000000..NNNNNN}.tar"'.
"""

from __future__ import annotations

import argparse
import os
import sys

from pretrain.data.storage import add_storage_option_flag, parse_storage_options
from pretrain.errors import UserError
from pretrain.prepare.embedded import digits_samples
from pretrain.prepare.images import JPEG_QUALITY, ImageSource, csv_samples, image_folder_samples, prepare_image_shards

BAD_INPUT_EXIT = 2
SAMPLES_PER_SHARD = 1000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--image-folder", metavar="DIR", help="directory or fsspec URL of one subdirectory per class")
    source.add_argument("--csv", metavar="FILE", help="CSV (path or fsspec URL) of path,label rows after a header")
    source.add_argument("--digits", action="store_true", help="scikit-learn's digits (1797 8x8 images, 10 classes)")
    p.add_argument("--output", required=True, help="directory or fsspec URL for the shards and index.json")
    p.add_argument(
        "--samples-per-shard",
        type=int,
        default=SAMPLES_PER_SHARD,
        help=f"images per tar shard (default: {SAMPLES_PER_SHARD})",
    )
    p.add_argument(
        "--short-side",
        type=int,
        metavar="N",
        help="shrink images whose shorter side exceeds N px to N (aspect kept); smaller ones are kept",
    )
    p.add_argument(
        "--jpeg-quality",
        type=int,
        default=JPEG_QUALITY,
        help=f"quality of JPEGs re-encoded after shrinking (default: {JPEG_QUALITY})",
    )
    p.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="encoding processes (default: the number of CPUs)"
    )
    add_storage_option_flag(p)
    p.add_argument(
        "--overwrite", action="store_true", help="replace what another preparation left at --output instead of stopping"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p.parse_args(argv)


def open_source(args: argparse.Namespace, options: dict) -> ImageSource:
    if args.digits:
        if args.short_side is not None:
            raise UserError("--short-side does not apply to --digits (8x8 images): leave it out")
        return digits_samples()
    if args.image_folder:
        return image_folder_samples(
            args.image_folder, args.short_side, jpeg_quality=args.jpeg_quality, storage_options=options
        )
    return csv_samples(args.csv, args.short_side, jpeg_quality=args.jpeg_quality, storage_options=options)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        options = parse_storage_options(args.storage_option)
        result = prepare_image_shards(
            open_source(args, options),
            args.output,
            args.samples_per_shard,
            options,
            workers=args.workers,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except UserError as exc:
        print(f"prepare_images: error: {exc}", file=sys.stderr)
        return BAD_INPUT_EXIT
    print(result.summary(args.output, f"{result.index['total_samples']} images, {result.index['num_classes']} classes"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
