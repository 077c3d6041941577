"""Where shard sets live: fsspec URLs, the files a shard set is made of, and local caches.

Every writer (tools/prepare_*.py, the embedded defaults) and the reader agree on the layout
defined here: numbered tar shards with numbered sample keys, and an `index.json` beside them,
written last, so a directory without it is unfinished.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import fsspec

from pretrain.errors import UserError

INDEX_NAME = "index.json"
SHARD_PATTERN = "shard-{:06d}.tar"
KEY_PATTERN = "{:09d}"
# A fixed member mtime makes the same input give byte-identical shards; an int, because tarfile
# adds a 1 KiB PAX header to every member whose mtime is a float (as time.time() is).
TAR_MTIME = 0


def url_to_fs(url: str, storage_options: dict, role: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of `url`, or a one-line error naming it as the `role` it plays."""
    try:
        return fsspec.core.url_to_fs(url, **storage_options)
    except (ValueError, ImportError, TypeError) as exc:
        raise UserError(
            f"cannot open {role} {url!r} ({exc}): use a local path or an fsspec URL like s3://bucket/dir, "
            "and check the storage options"
        ) from None


def add_storage_option_flag(parser: argparse.ArgumentParser) -> None:
    """The tools' repeatable --storage-option KEY=VALUE, read back by `parse_storage_options`."""
    parser.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec option for input and output URLs, repeatable (e.g. endpoint_url=http://host:9000); "
        "VALUE is read as JSON when it parses (true, 3, {...}), else as a string",
    )


def parse_storage_options(pairs: list[str]) -> dict:
    """KEY=VALUE pairs from the tools' --storage-option; values that parse as JSON get its type
    (true, 3, {...}), others stay strings (http://host:9000)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--storage-option {pair!r} is not KEY=VALUE: write it like endpoint_url=http://host:9000")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


def build_once(
    final: Path,
    build: Callable[[Path], None],
    is_preparer: bool,
    wait_timeout_s: float,
    poll_interval_s: float,
) -> str:
    """A local shard set at `final`, built by `build(directory)` once per cache and machine.

    The preparer (local rank 0) builds into a temporary sibling and renames it into place, so
    nobody ever sees half a shard set; every other process waits for its `index.json`.
    """
    if (final / INDEX_NAME).is_file():
        return str(final)
    if not is_preparer:
        return _wait_for_index(final, wait_timeout_s, poll_interval_s)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    except OSError as exc:
        raise UserError(
            f"cannot create data.cache_dir {final.parent} ({exc}): set data.cache_dir to a writable directory"
        ) from None
    try:
        build(tmp)
        try:
            tmp.rename(final)
        except OSError:
            if not (final / INDEX_NAME).is_file():  # not a lost race: something else is in the way
                raise UserError(f"{final} exists without {INDEX_NAME}: delete it and re-run") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return str(final)


def _wait_for_index(directory: Path, timeout_s: float, poll_interval_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while not (directory / INDEX_NAME).is_file():
        if time.monotonic() > deadline:
            raise UserError(
                f"waited {timeout_s:.0f}s for {directory / INDEX_NAME} from the local rank 0 preparer: "
                "check its log, or that data.cache_dir is the same path for every process"
            )
        time.sleep(poll_interval_s)
    return str(directory)
