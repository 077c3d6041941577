"""Turning text into token-block shards, once, before training.

Training never tokenizes: documents are encoded here, joined into one stream with an
end-of-text token after each, cut into fixed-length blocks and written as webdataset tar shards
with an `index.json` beside them. The index is written last, so an output without it is an
unfinished one. Sections: the shard writer, the document sources (text files, the stdlib
corpus), and the run-time preparation of the embedded default corpus.
"""

from __future__ import annotations

import ast
import io
import json
import os
import random
import shutil
import sys
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import tiktoken
from tqdm import tqdm
from webdataset import TarWriter

from pretrain.data.tokenizer import GPT2_NAME, load_tokenizer
from pretrain.errors import UserError

INDEX_NAME = "index.json"
INDEX_FORMAT = "token-blocks"
INDEX_VERSION = 1
SHARD_PATTERN = "shard-{:06d}.tar"
KEY_PATTERN = "{:09d}"
BLOCK_MEMBER = "npy"
# A fixed member mtime makes the same input give byte-identical shards; an int, because tarfile
# adds a 1 KiB PAX header to every member whose mtime is a float (as time.time() is).
TAR_MTIME = 0

# Bump when the stdlib corpus changes, so caches built by older code are not reused.
STDLIB_CORPUS_VERSION = 2
STDLIB_SHUFFLE_SEED = 0  # fixed: the embedded corpus is the same on every machine and run
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"})


# --------------------------------------------------------------------------- shard writer


def block_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype holding every id: half the bytes for GPT-2's 50257 ids."""
    for dtype in (np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise UserError(f"tokenizer vocab_size {vocab_size} does not fit in uint32: use a smaller vocabulary")


def write_token_shards(
    documents: Iterable[str],
    output: str,
    block_len: int,
    blocks_per_shard: int,
    tokenizer_name: str = GPT2_NAME,
    storage_options: dict | None = None,
    *,
    source: str = "",
    progress: bool = False,
) -> dict:
    """Tokenize `documents` into `block_len`-token blocks under the fsspec URL `output`.

    Each document ends with the tokenizer's end-of-text id; the trailing partial block is
    dropped and counted in the index. Returns the index that was written last.
    """
    if block_len < 2:
        raise UserError(f"block_len={block_len} is too small: a block holds inputs plus one label, use >= 2")
    if blocks_per_shard < 1:
        raise UserError(f"blocks_per_shard={blocks_per_shard} must be >= 1")
    enc = load_tokenizer(tokenizer_name)
    dtype = block_dtype(enc.n_vocab)
    fs, root = _output_fs(output, storage_options or {})
    index_path = f"{root.rstrip('/')}/{INDEX_NAME}"
    try:
        fs.makedirs(root, exist_ok=True)
        if fs.exists(index_path):  # an overwrite in progress must not look finished
            fs.rm(index_path)
        with _ShardSink(fs, root, blocks_per_shard) as sink, tqdm(
            desc="tokens", unit="tok", unit_scale=True, disable=not progress, file=sys.stderr
        ) as bar:
            n_docs, dropped = _write_blocks(documents, enc, block_len, dtype, sink, bar)
    except OSError as exc:
        raise UserError(
            f"cannot write shards to {output} ({type(exc).__name__}: {exc}): check the path and permissions"
        ) from None
    if not sink.shards:
        raise UserError(
            f"the input gave {dropped} tokens, fewer than one block of block_len={block_len}: "
            "add text or lower block_len (--block-len)"
        )
    index = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "block_len": block_len,
        "dtype": dtype.name,
        "tokenizer": {"name": tokenizer_name, "vocab_size": enc.n_vocab, "eot": enc.eot_token},
        "shards": sink.shards,
        "total_blocks": sink.total_blocks,
        "total_tokens": sink.total_blocks * block_len,
        "dropped_tokens": dropped,
        "documents": n_docs,
        "source": source,
    }
    try:
        with fs.open(index_path, "w") as f:
            json.dump(index, f, indent=1)
    except OSError as exc:
        raise UserError(
            f"cannot write {output}/{INDEX_NAME} ({exc}): check the path and permissions"
        ) from None
    return index


def _write_blocks(
    documents: Iterable[str],
    enc: tiktoken.Encoding,
    block_len: int,
    dtype: np.dtype,
    sink: _ShardSink,
    bar: tqdm,
) -> tuple[int, int]:
    """Stream documents into whole blocks; return (documents read, tokens left over)."""
    pending: list[int] = []
    n_docs = 0
    for n_docs, doc in enumerate(documents, start=1):
        tokens = enc.encode_ordinary(doc)
        tokens.append(enc.eot_token)
        bar.update(len(tokens))
        pending.extend(tokens)
        whole = len(pending) // block_len * block_len
        for start in range(0, whole, block_len):
            sink.write(np.asarray(pending[start : start + block_len], dtype=dtype))
        del pending[:whole]
    return n_docs, len(pending)


class _ShardSink:
    """Writes blocks as numbered samples, starting a new tar every `blocks_per_shard` blocks."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, blocks_per_shard: int) -> None:
        self.fs, self.root, self.blocks_per_shard = fs, root.rstrip("/"), blocks_per_shard
        self.shards: list[dict[str, Any]] = []
        self.total_blocks = 0
        self._file: Any = None
        self._tar: TarWriter | None = None

    def write(self, block: np.ndarray) -> None:
        if self._tar is None or self.shards[-1]["samples"] == self.blocks_per_shard:
            self._open_next()
        buf = io.BytesIO()
        np.save(buf, block, allow_pickle=False)
        self._tar.write({"__key__": KEY_PATTERN.format(self.total_blocks), BLOCK_MEMBER: buf.getvalue()})
        self.shards[-1]["samples"] += 1
        self.total_blocks += 1

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

    def __enter__(self) -> _ShardSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self._close_current()


def _output_fs(output: str, storage_options: dict) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return fsspec.core.url_to_fs(output, **storage_options)
    except (ValueError, ImportError, TypeError) as exc:
        raise UserError(
            f"cannot open output {output!r} ({exc}): use a local path or an fsspec URL like s3://bucket/dir"
        ) from None


# --------------------------------------------------------------------------- document sources


def find_text_files(inputs: Iterable[str]) -> list[Path]:
    """Files as given, directories expanded to their `*.txt` files (recursively, sorted)."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not found:
                raise UserError(f"input directory {item} holds no *.txt files: add some or pass files")
            files.extend(found)
        else:
            raise UserError(f"input {item} does not exist: pass text files or directories of *.txt")
    if not files:
        raise UserError("no input given: pass text files or directories, or --stdlib-mb N")
    return files


def file_documents(paths: Iterable[Path]) -> Iterator[str]:
    """One document per UTF-8 text file."""
    for path in paths:
        try:
            yield path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read {path} as UTF-8 text ({exc}): convert or remove it") from None


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


# --------------------------------------------------------------------------- embedded default


def stdlib_corpus_name(block_len: int, max_bytes: int, tokenizer_name: str = GPT2_NAME) -> str:
    """Everything that changes the shards is in the name, so a stale cache is never reused."""
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    return f"stdlib-py{py}-v{STDLIB_CORPUS_VERSION}-{tokenizer_name}-b{block_len}-{max_bytes}B"


def prepare_stdlib_corpus(
    cache_dir: str,
    block_len: int,
    blocks_per_shard: int,
    max_bytes: int,
    is_preparer: bool,
    wait_timeout_s: float = 600,
    *,
    poll_interval_s: float = 0.5,
    progress: bool = False,
) -> str:
    """Local directory of stdlib-corpus shards, built once per cache and shared by all processes.

    The preparer (one per machine: local rank 0) builds into a temporary sibling and renames it
    into place, so nobody ever sees half a corpus; everyone else waits for `index.json`.
    """
    parent = Path(cache_dir).expanduser()
    final = parent / stdlib_corpus_name(block_len, max_bytes)
    if (final / INDEX_NAME).is_file():
        return str(final)
    if not is_preparer:
        return _wait_for_index(final, wait_timeout_s, poll_interval_s)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=parent))
    except OSError as exc:
        raise UserError(
            f"cannot create data.cache_dir {parent} ({exc}): set data.cache_dir to a writable directory"
        ) from None
    documents = list(stdlib_documents(max_bytes))
    # stdlib_documents gives all docstrings, then all source: shuffled, every shard mixes both,
    # so the loss does not jump with the shard a rank happens to be reading.
    random.Random(STDLIB_SHUFFLE_SEED).shuffle(documents)
    try:
        write_token_shards(
            documents,
            str(tmp),
            block_len,
            blocks_per_shard,
            source=f"python {sys.version.split()[0]} stdlib at {sysconfig.get_paths()['stdlib']}: "
            f"docstrings and source text, documents shuffled (seed {STDLIB_SHUFFLE_SEED}); {max_bytes} bytes",
            progress=progress,
        )
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
