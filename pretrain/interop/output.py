"""An output directory that appears whole or not at all, at a local path or any fsspec URL.

Exports are written into a local staging directory first. A local destination is then renamed
into place (one rename on the same filesystem); a remote one is uploaded file by file with
`config.json` last, the file every reader opens first, so that a copy cut short is never taken
for a model, and what was uploaded is removed on failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator

from fsspec.implementations.local import LocalFileSystem
from tqdm import tqdm

from pretrain.data.storage import url_to_fs
from pretrain.errors import UserError

COMMIT_FILE = "config.json"


@contextlib.contextmanager
def staged_output(
    url: str,
    storage_options: dict,
    overwrite: bool,
    progress: bool = False,
    on_commit: Callable[[str], None] | None = None,
) -> Iterator[str]:
    """Yields an empty local directory; when the block ends without an error its files become
    `url` (replacing what is there only with `overwrite`), otherwise nothing changes at `url`.
    `on_commit(directory)`, if given, runs once they are there, with a local directory holding
    them (`url` itself when local, else the staged copy): an error it raises leaves them there."""
    fs, path = url_to_fs(url, storage_options, "output")
    path = path.rstrip("/")
    if fs.exists(path) and not overwrite:
        raise UserError(f"{url} already exists: pass --overwrite to replace it, or choose another output")
    local = isinstance(fs, LocalFileSystem)
    parent = os.path.dirname(os.path.abspath(path)) if local else None
    if parent is not None:
        os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        yield staging
        if local:
            _rename_into_place(staging, path)
        else:
            _upload(fs, staging, path, progress)
        if on_commit is not None:
            on_commit(path if local else staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _rename_into_place(staging: str, path: str) -> None:
    old = None
    if os.path.lexists(path):
        old = f"{os.path.dirname(path)}/.{os.path.basename(path)}.old-{uuid.uuid4().hex[:8]}"
        os.rename(path, old)
    os.rename(staging, path)
    if old is not None:
        shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)


def _upload(fs, staging: str, path: str, progress: bool) -> None:
    files = sorted(
        os.path.relpath(os.path.join(d, name), staging) for d, _, names in os.walk(staging) for name in names
    )
    files.sort(key=lambda f: f == COMMIT_FILE)  # the commit file last
    if fs.exists(path):
        fs.rm(path, recursive=True)
    total = sum(os.path.getsize(os.path.join(staging, f)) for f in files)
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"uploading to {path}", disable=not progress) as bar:
            for relative in files:
                fs.put_file(os.path.join(staging, relative), f"{path}/{relative.replace(os.sep, '/')}")
                bar.update(os.path.getsize(os.path.join(staging, relative)))
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(path, recursive=True)
        raise
