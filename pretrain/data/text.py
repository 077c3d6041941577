"""Turning text into token-block shards, once, before training.

Training never tokenizes: documents are encoded here (in parallel processes), joined into one
stream with an end-of-text token after each, cut into fixed-length blocks and written as
webdataset tar shards with an `index.json` beside them. The index is written last, so an
output without it is an unfinished one.

A run is resumable. Each shard is written under a temporary name, moved into place when
complete, and recorded in `_progress.json` with a fingerprint of everything that decides the
shards' content (inputs, tokenizer, block_len, blocks per shard). Tokenization is deterministic,
so a re-run with the same fingerprint yields the same block stream: it tokenizes through the
finished shards without rewriting them (checking that their blocks hash the same) and writes
from the first unfinished one.

Sections: shard sizing, preparation, tokenization, the shard writer, the output's files, the
document sources (text, JSONL and Parquet files; the stdlib corpus), the embedded default.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import posixpath
import random
import sys
import sysconfig
import tarfile
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from tqdm import tqdm
from webdataset import TarWriter

from pretrain.data.storage import INDEX_NAME, KEY_PATTERN, SHARD_PATTERN, TAR_MTIME, build_once, url_to_fs
from pretrain.data.tokenizer import GPT2_NAME, load_tokenizer
from pretrain.errors import UserError

INDEX_FORMAT = "token-blocks"
INDEX_VERSION = 1
PROGRESS_NAME = "_progress.json"
SHARD_GLOB = "shard-*.tar*"  # SHARD_PATTERN's files, finished or partial
PARTIAL_SUFFIX = ".partial"  # a file being written; never matched by a shard brace pattern
BLOCK_MEMBER = "npy"
TAR_END_BYTES = 2 * tarfile.BLOCKSIZE  # the two zero blocks that close an archive

INPUT_SUFFIXES = (".txt", ".jsonl", ".parquet")
INPUT_KINDS = ".txt, .jsonl or .parquet"
GLOB_CHARS = frozenset("*?[")
DEFAULT_TEXT_FIELD = "text"
DEFAULT_CHUNK_CHARS = 2**20  # text per tokenization task: big enough to amortize the hand-off
DEFAULT_PENDING_PER_WORKER = 2  # tasks queued per worker: keeps workers busy, bounds memory
DEFAULT_PARQUET_BATCH_ROWS = 1024
DEFAULT_READ_BYTES = 2**20

# Bump when the stdlib corpus changes, so caches built by older code are not reused.
STDLIB_CORPUS_VERSION = 3
STDLIB_SPLITS = ("train", "val")
STDLIB_VAL_EVERY = 20  # after the shuffle, document i is held out for validation when i % 20 == 19
STDLIB_SHUFFLE_SEED = 0  # fixed: the embedded corpus is the same on every machine and run
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"})


# --------------------------------------------------------------------------- shard sizing


def block_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype holding every id: half the bytes for GPT-2's 50257 ids."""
    for dtype in (np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise UserError(f"tokenizer vocab_size {vocab_size} does not fit in uint32: use a smaller vocabulary")


def block_member_bytes(block_len: int, dtype: np.dtype) -> int:
    """Bytes one block takes in a shard: a tar header block plus the .npy padded to whole blocks.

    The .npy size is measured with np.save itself, so its header length is exact, not assumed.
    Member names are short and mtimes ints, so tarfile adds no PAX or long-name headers.
    """
    _check_block_len(block_len)
    buf = io.BytesIO()
    np.save(buf, np.zeros(block_len, dtype=dtype), allow_pickle=False)
    return tarfile.BLOCKSIZE + _round_up(buf.tell(), tarfile.BLOCKSIZE)


def shard_bytes(n_blocks: int, block_len: int, dtype: np.dtype) -> int:
    """Exact size of a shard of `n_blocks`: its members and end marker, padded by tarfile to a
    whole record."""
    return _round_up(n_blocks * block_member_bytes(block_len, dtype) + TAR_END_BYTES, tarfile.RECORDSIZE)


def blocks_per_shard_for(target_bytes: int, block_len: int, dtype: np.dtype) -> int:
    """The most blocks whose shard is at most `target_bytes`: shards are cut at whole blocks."""
    usable = target_bytes // tarfile.RECORDSIZE * tarfile.RECORDSIZE - TAR_END_BYTES
    n_blocks = usable // block_member_bytes(block_len, dtype)
    if n_blocks < 1:
        raise UserError(
            f"shard size {target_bytes} bytes cannot hold one block of block_len={block_len} "
            f"(a one-block shard takes {shard_bytes(1, block_len, dtype)} bytes): raise --shard-size-mb"
        )
    return n_blocks


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _check_block_len(block_len: int) -> None:
    if block_len < 2:
        raise UserError(f"block_len={block_len} is too small: a block holds inputs plus one label, use >= 2")


# --------------------------------------------------------------------------- preparation


@dataclass(frozen=True)
class PrepareResult:
    """What a run did: the index, shards it wrote, shards an earlier run had finished, and
    whether the output was complete before it started."""

    index: dict
    written: int
    skipped: int
    already_done: bool = False


def prepare_token_shards(
    documents: Iterable[str],
    output: str,
    block_len: int,
    blocks_per_shard: int,
    tokenizer_name: str = GPT2_NAME,
    storage_options: dict | None = None,
    *,
    identity: Any,
    source: str = "",
    workers: int = 1,
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
    overwrite: bool = False,
    progress: bool = False,
) -> PrepareResult:
    """Tokenize `documents` into `block_len`-token blocks under the fsspec URL `output`, resumably.

    `identity` is JSON naming the documents (e.g. input files and sizes); with the tokenizer and
    block settings it makes the fingerprint that a re-run must match to resume, or to find the
    output done. `workers` processes tokenize tasks of about `chunk_chars` characters; the
    shards are the same for any number of workers. Each document ends with the tokenizer's
    end-of-text id; the trailing partial block is dropped and counted in the index.
    """
    _check_block_len(block_len)
    for name, value in (("blocks_per_shard", blocks_per_shard), ("workers", workers), ("chunk_chars", chunk_chars)):
        if value < 1:
            raise UserError(f"{name}={value} must be >= 1")
    enc = load_tokenizer(tokenizer_name)
    dtype = block_dtype(enc.n_vocab)
    tokenizer = {"name": tokenizer_name, "vocab_size": enc.n_vocab, "eot": enc.eot_token}
    config = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "inputs": identity,
        "tokenizer": tokenizer,
        "block_len": block_len,
        "blocks_per_shard": blocks_per_shard,
    }
    fingerprint = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    out = _Output(output, storage_options or {}, fingerprint, config)
    try:
        done, finished = out.begin(overwrite)
        if done is not None:
            return PrepareResult(done, written=0, skipped=len(done["shards"]), already_done=True)
        chunks = _encoded_chunks(documents, tokenizer_name, dtype, workers, chunk_chars)
        with (
            contextlib.closing(chunks),
            _ShardSink(out, blocks_per_shard, finished) as sink,
            tqdm(desc="tokens", unit="tok", unit_scale=True, disable=not progress, file=sys.stderr) as bar,
        ):
            n_docs, dropped = _pack(chunks, block_len, dtype, sink, bar)
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
            "tokenizer": tokenizer,
            "shards": [{"name": s["name"], "samples": s["samples"]} for s in sink.shards],
            "total_blocks": sink.total_blocks,
            "total_tokens": sink.total_blocks * block_len,
            "dropped_tokens": dropped,
            "documents": n_docs,
            "source": source,
            "fingerprint": fingerprint,
        }
        out.finish(index)
    except OSError as exc:
        raise UserError(
            f"cannot write shards to {output} ({type(exc).__name__}: {exc}): check the path, permissions "
            "and storage options"
        ) from None
    return PrepareResult(index, written=sink.written, skipped=len(sink.shards) - sink.written)


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
    """In-process `prepare_token_shards` for documents described by `source`; returns the index."""
    return prepare_token_shards(
        documents,
        output,
        block_len,
        blocks_per_shard,
        tokenizer_name,
        storage_options,
        identity=source,
        source=source,
        progress=progress,
    ).index


def prepare_text_files(
    inputs: Iterable[str],
    output: str,
    block_len: int,
    blocks_per_shard: int,
    tokenizer_name: str = GPT2_NAME,
    storage_options: dict | None = None,
    *,
    text_field: str = DEFAULT_TEXT_FIELD,
    workers: int = 1,
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
    overwrite: bool = False,
    progress: bool = False,
) -> PrepareResult:
    """Shards from .txt/.jsonl/.parquet files, local or fsspec (what tools/prepare_text.py runs).

    Every file's name and size is in the fingerprint, so a changed input is not mistaken for
    the rest of an interrupted run; `storage_options` serve the inputs and the output alike.
    """
    inputs = list(inputs)
    files = find_input_files(inputs, storage_options)
    return prepare_token_shards(
        input_documents(files, text_field),
        output,
        block_len,
        blocks_per_shard,
        tokenizer_name,
        storage_options,
        identity={"files": [[f.name, f.size] for f in files], "text_field": text_field},
        source="files: " + " ".join(inputs),
        workers=workers,
        chunk_chars=chunk_chars,
        overwrite=overwrite,
        progress=progress,
    )


def _pack(
    chunks: Iterable[np.ndarray], block_len: int, dtype: np.dtype, sink: _ShardSink, bar: tqdm
) -> tuple[int, int]:
    """Cut the token stream into whole blocks; return (documents read, tokens left over)."""
    pending = np.empty(0, dtype=dtype)
    n_docs = 0
    for tokens, docs in chunks:
        n_docs += docs
        bar.update(len(tokens))
        stream = np.concatenate([pending, tokens])
        whole = len(stream) // block_len * block_len
        for block in stream[:whole].reshape(-1, block_len):
            sink.write(block)
        pending = stream[whole:]
    return n_docs, len(pending)


# --------------------------------------------------------------------------- tokenization


class _ChunkEncoder:
    """Documents -> one token array with the end-of-text id after each document."""

    def __init__(self, tokenizer_name: str, dtype: str) -> None:
        self.enc = load_tokenizer(tokenizer_name)
        self.dtype = np.dtype(dtype)

    def __call__(self, documents: list[str]) -> np.ndarray:
        tokens: list[int] = []
        for doc in documents:
            tokens.extend(self.enc.encode_ordinary(doc))
            tokens.append(self.enc.eot_token)
        return np.array(tokens, dtype=self.dtype)


_worker_encoder: _ChunkEncoder | None = None


def _init_worker(tokenizer_name: str, dtype: str) -> None:
    global _worker_encoder
    _worker_encoder = _ChunkEncoder(tokenizer_name, dtype)


def _encode_in_worker(documents: list[str]) -> np.ndarray:
    return _worker_encoder(documents)


def _encoded_chunks(
    documents: Iterable[str],
    tokenizer_name: str,
    dtype: np.dtype,
    workers: int,
    chunk_chars: int,
    pending_per_worker: int = DEFAULT_PENDING_PER_WORKER,
) -> Iterator[tuple[np.ndarray, int]]:
    """(tokens, number of documents) per chunk, in input order whatever the number of workers.

    Tasks are submitted a few at a time, not through Pool.imap, whose feeder thread would read
    the whole corpus into memory ahead of the workers. Workers are spawned, not forked: the
    parent may run threads (fsspec's event loop) that a fork would copy mid-lock.
    """
    chunks = _chunk_documents(documents, chunk_chars)
    if workers == 1:
        encode = _ChunkEncoder(tokenizer_name, dtype.str)
        for chunk in chunks:
            yield encode(chunk), len(chunk)
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(tokenizer_name, dtype.str)) as pool:
        queued: deque = deque()
        for chunk in chunks:
            queued.append((pool.apply_async(_encode_in_worker, (chunk,)), len(chunk)))
            if len(queued) >= workers * pending_per_worker:
                result, n_docs = queued.popleft()
                yield result.get(), n_docs
        while queued:
            result, n_docs = queued.popleft()
            yield result.get(), n_docs


def _chunk_documents(documents: Iterable[str], chunk_chars: int) -> Iterator[list[str]]:
    """Consecutive documents grouped into tasks of at least `chunk_chars` characters (the last
    one may be smaller); the grouping does not change the tokens, only the hand-off size."""
    chunk: list[str] = []
    size = 0
    for doc in documents:
        chunk.append(doc)
        size += len(doc)
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


# --------------------------------------------------------------------------- shard writer


class _ShardSink:
    """Writes blocks as numbered samples, starting a new tar every `blocks_per_shard` blocks.

    A shard is written under a temporary name and moved into place only when complete, then
    recorded in the progress file. Shards in `finished` (from an earlier run) are not written:
    their blocks are counted and hashed, and must match what that run recorded.
    """

    def __init__(self, out: _Output, blocks_per_shard: int, finished: list[dict]) -> None:
        self.out, self.blocks_per_shard, self.finished = out, blocks_per_shard, finished
        self.shards: list[dict[str, Any]] = []  # completed: name, samples, sha256 of the blocks
        self.total_blocks = 0
        self.written = 0
        self._hash: Any = None  # the current shard's, None before the first block
        self._samples = 0
        self._file: Any = None
        self._tar: TarWriter | None = None

    def write(self, block: np.ndarray) -> None:
        if self._hash is None or self._samples == self.blocks_per_shard:
            self._finish_current()
            self._start_next()
        self._hash.update(block.tobytes())
        if self._tar is not None:
            buf = io.BytesIO()
            np.save(buf, block, allow_pickle=False)
            self._tar.write({"__key__": KEY_PATTERN.format(self.total_blocks), BLOCK_MEMBER: buf.getvalue()})
        self._samples += 1
        self.total_blocks += 1

    def _start_next(self) -> None:
        self._hash, self._samples = hashlib.sha256(), 0
        number = len(self.shards)
        if number >= len(self.finished):
            self._file = self.out.fs.open(self.out.path(SHARD_PATTERN.format(number) + PARTIAL_SUFFIX), "wb")
            self._tar = TarWriter(self._file, encoder=False, mtime=TAR_MTIME)

    def _finish_current(self) -> None:
        if self._hash is None:
            return
        name = SHARD_PATTERN.format(len(self.shards))
        shard = {"name": name, "samples": self._samples, "sha256": self._hash.hexdigest()}
        self._hash = None
        if self._tar is None:
            self._check_unchanged(shard)
            self.shards.append(shard)
            return
        self._close_files()
        self.out.fs.mv(self.out.path(name + PARTIAL_SUFFIX), self.out.path(name))
        self.shards.append(shard)
        self.written += 1
        self.out.record(self.shards)

    def _check_unchanged(self, shard: dict) -> None:
        if shard != self.finished[len(self.shards)]:
            raise self._inputs_changed(shard["name"])

    def _inputs_changed(self, name: str) -> UserError:
        return UserError(
            f"{self.out.url}/{name} was finished by an earlier run, but the inputs now give other "
            "tokens for it: the inputs changed; pass --overwrite to prepare them afresh"
        )

    def _close_files(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._file.close()
            self._tar = self._file = None

    def __enter__(self) -> _ShardSink:
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        """Complete the last shard only on success: after an error it stays a partial file."""
        if exc_type is not None:
            self._close_files()
            return
        self._finish_current()
        if len(self.shards) < len(self.finished):
            raise self._inputs_changed(self.finished[len(self.shards)]["name"])


# --------------------------------------------------------------------------- the output's files


class _Output:
    """The output location through fsspec: shards, the progress record and the index."""

    def __init__(self, url: str, storage_options: dict, fingerprint: str, config: dict) -> None:
        self.url, self.fingerprint, self.config = url.rstrip("/"), fingerprint, config
        self.fs, root = url_to_fs(url, storage_options, "output")
        self.root = root.rstrip("/")

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def begin(self, overwrite: bool) -> tuple[dict | None, list[dict]]:
        """(index, []) when this preparation is already complete, else (None, shards finished by
        an earlier run of it); anything else found at the output is an error unless `overwrite`."""
        self.fs.makedirs(self.root, exist_ok=True)
        self.fs.invalidate_cache(self.root)  # another process (or run) may have changed it
        if overwrite:
            self._clear()
        elif (index := self._read_json(INDEX_NAME)) is not None:
            self._check_fingerprint(index, INDEX_NAME)
            return index, []
        elif (progress := self._read_json(PROGRESS_NAME)) is not None:
            self._check_fingerprint(progress, PROGRESS_NAME)
            return None, self._still_present(self._finished_shards(progress))
        elif self.fs.glob(self.path(SHARD_GLOB)):
            raise UserError(
                f"{self.url} holds shard files but no {INDEX_NAME} or {PROGRESS_NAME}: they are not from "
                "an unfinished run of this tool; write to a new output, or pass --overwrite to replace them"
            )
        self.record([])
        return None, []

    def record(self, shards: list[dict]) -> None:
        """The progress file: which shards are complete, for this fingerprint."""
        self._write_json(PROGRESS_NAME, {"fingerprint": self.fingerprint, "config": self.config, "shards": shards})

    def finish(self, index: dict) -> None:
        self._write_json(INDEX_NAME, index)
        self.fs.rm(self.path(PROGRESS_NAME))

    def _check_fingerprint(self, record: dict, name: str) -> None:
        if record.get("fingerprint") != self.fingerprint:
            raise UserError(
                f"{self.url}/{name} is from a different preparation (other inputs, tokenizer, block_len or "
                "shard size): write to a new output, or pass --overwrite to replace it"
            )

    def _finished_shards(self, progress: dict) -> list[dict]:
        shards = progress.get("shards")
        keys = {"name", "samples", "sha256"}
        if not (isinstance(shards, list) and all(isinstance(s, dict) and s.keys() == keys for s in shards)):
            raise UserError(f"{self.url}/{PROGRESS_NAME} is damaged (no valid 'shards' list): pass --overwrite")
        return shards

    def _still_present(self, shards: list[dict]) -> list[dict]:
        """The recorded shards up to the first one that is gone (deleted since): it is redone."""
        present = {posixpath.basename(p) for p in self.fs.ls(self.root, detail=False)}
        for i, shard in enumerate(shards):
            if shard["name"] not in present:
                return shards[:i]
        return shards

    def _clear(self) -> None:
        """Remove what this tool writes, and nothing else the directory may hold."""
        found = [
            p
            for pattern in (SHARD_GLOB, INDEX_NAME + "*", PROGRESS_NAME + "*")
            for p in self.fs.glob(self.path(pattern))
        ]
        if found:
            self.fs.rm(found)

    def _read_json(self, name: str) -> dict | None:
        path = self.path(name)
        if not self.fs.exists(path):
            return None
        try:
            with self.fs.open(path, "rb") as f:
                data = json.load(f)
        except ValueError as exc:
            raise UserError(f"{self.url}/{name} is not valid JSON ({exc}): pass --overwrite to start afresh") from None
        if not isinstance(data, dict):
            raise UserError(f"{self.url}/{name} is not a JSON object: pass --overwrite to start afresh")
        return data

    def _write_json(self, name: str, data: dict) -> None:
        """Whole or not at all: written under a temporary name, then moved into place."""
        partial = self.path(name + PARTIAL_SUFFIX)
        with self.fs.open(partial, "w") as f:
            json.dump(data, f, indent=1)
        self.fs.mv(partial, self.path(name))


# --------------------------------------------------------------------------- document sources


@dataclass(frozen=True)
class InputFile:
    """One input file on any fsspec filesystem; its name and size go into the fingerprint."""

    fs: fsspec.AbstractFileSystem
    path: str
    size: int

    @property
    def name(self) -> str:
        return self.path if isinstance(self.fs, LocalFileSystem) else self.fs.unstrip_protocol(self.path)

    @property
    def suffix(self) -> str:
        return _suffix(self.path)


def find_input_files(inputs: Iterable[str], storage_options: dict | None = None) -> list[InputFile]:
    """Files as given; directories and glob patterns expanded to their .txt/.jsonl/.parquet
    files, recursively and sorted, so the same inputs always give the same document order."""
    files = [f for item in inputs for f in _expand_input(item, storage_options or {})]
    if not files:
        raise UserError(f"no input given: pass {INPUT_KINDS} files, directories or glob patterns, or --stdlib-mb N")
    return files


def _expand_input(item: str, storage_options: dict) -> list[InputFile]:
    fs, path = url_to_fs(item, storage_options, "input")
    try:
        if GLOB_CHARS.intersection(path):
            paths = sorted(fs.glob(path))
        elif fs.isfile(path) and _suffix(path) not in INPUT_SUFFIXES:
            raise UserError(f"input {item} is not a {INPUT_KINDS} file: convert or rename it")
        elif fs.exists(path):
            paths = [path]
        else:
            raise UserError(f"input {item} does not exist: pass {INPUT_KINDS} files, directories or glob patterns")
        files = [f for p in paths for f in _files_under(fs, p)]
    except OSError as exc:
        raise UserError(
            f"cannot list input {item} ({type(exc).__name__}: {exc}): check the path, permissions and --storage-option"
        ) from None
    if not files:
        raise UserError(f"input {item} holds or matches no {INPUT_KINDS} files: add some or fix the path")
    return files


def _files_under(fs: fsspec.AbstractFileSystem, path: str) -> list[InputFile]:
    info = fs.info(path)
    if info["type"] == "directory":
        found = fs.find(path, detail=True)
        return [InputFile(fs, p, i["size"]) for p, i in sorted(found.items()) if _suffix(p) in INPUT_SUFFIXES]
    return [InputFile(fs, path, info["size"])] if _suffix(path) in INPUT_SUFFIXES else []


def _suffix(path: str) -> str:
    return posixpath.splitext(path)[1].lower()


def input_documents(
    files: Iterable[InputFile],
    text_field: str = DEFAULT_TEXT_FIELD,
    *,
    parquet_batch_rows: int = DEFAULT_PARQUET_BATCH_ROWS,
    read_bytes: int = DEFAULT_READ_BYTES,
) -> Iterator[str]:
    """Documents in file order: a .txt file is one, a .jsonl line or a Parquet row is one (its
    `text_field`). Files are streamed, never read whole, except .txt (one document anyway)."""
    for file in files:
        try:
            if file.suffix == ".txt":
                yield _text_document(file)
            elif file.suffix == ".jsonl":
                yield from _jsonl_documents(file, text_field, read_bytes)
            else:
                yield from _parquet_documents(file, text_field, parquet_batch_rows)
        except OSError as exc:
            raise UserError(
                f"cannot read input {file.name} ({type(exc).__name__}: {exc}): check it is readable"
            ) from None


def _text_document(file: InputFile) -> str:
    with file.fs.open(file.path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"cannot read {file.name} as UTF-8 text ({exc}): convert or remove it") from None


def _jsonl_documents(file: InputFile, field: str, read_bytes: int) -> Iterator[str]:
    with file.fs.open(file.path, "rb") as f:
        for number, line in enumerate(_lines(f, read_bytes), start=1):
            if line.strip():
                yield _jsonl_text(line, field, f"{file.name} line {number}")


def _lines(f: IO[bytes], read_bytes: int) -> Iterator[bytes]:
    """Lines without their newline, from reads of `read_bytes`: fsspec's own readline re-reads a
    whole block per line, which is slow on object stores."""
    rest = b""
    while chunk := f.read(read_bytes):
        lines = chunk.split(b"\n")
        lines[0] = rest + lines[0]
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def _jsonl_text(line: bytes, field: str, where: str) -> str:
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise UserError(f"{where} is not valid JSON ({exc}): fix or remove the line") from None
    if not isinstance(record, dict) or field not in record:
        raise UserError(f"{where} has no field {field!r}: set --text-field to the field that holds the text")
    text = record[field]
    if not isinstance(text, str):
        raise UserError(f"{where}: field {field!r} is {type(text).__name__}, not a string: fix the line")
    return text


def _parquet_documents(file: InputFile, column: str, batch_rows: int) -> Iterator[str]:
    """The column's values, a record batch at a time, so a large file is never held whole."""
    with file.fs.open(file.path, "rb") as f:
        try:
            parquet = pq.ParquetFile(f)
            _check_text_column(parquet.schema_arrow, column, file.name)
            row = 0
            for batch in parquet.iter_batches(batch_size=batch_rows, columns=[column]):
                texts = batch.column(0).to_pylist()
                if None in texts:
                    raise UserError(
                        f"{file.name} row {row + texts.index(None) + 1}: column {column!r} is null: "
                        "drop or fill such rows"
                    )
                row += len(texts)
                yield from texts
        except pa.ArrowException as exc:
            raise UserError(f"cannot read {file.name} as Parquet ({exc}): check or rewrite the file") from None


def _check_text_column(schema: pa.Schema, column: str, name: str) -> None:
    if column not in schema.names:
        raise UserError(
            f"{name} has no column {column!r} (it has: {', '.join(schema.names)}): "
            "set --text-field to the column that holds the text"
        )
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise UserError(f"{name}: column {column!r} is {kind}, not strings: set --text-field to a text column")


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
