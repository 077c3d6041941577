"""Turning documents into token-block shards, once, before training.

Training never tokenizes: documents are encoded here (in parallel processes), each packed as
[BOS if the tokenizer has one] + its tokens + [EOS] (see pretrain/data/tokenizer.py), joined
into one stream, cut into fixed-length blocks and written by the resumable `ShardWriter`; the
tokenizer's files are copied beside the shards (tokenizer/), its identity is in the index.
Tokenization is deterministic, so a re-run with the same fingerprint yields the same block
stream: it tokenizes through the finished shards without rewriting them (their blocks must hash
as recorded) and writes from the first unfinished one.
"""

from __future__ import annotations

import contextlib
import functools
import io
import sys
import tarfile
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from tqdm import tqdm

from pretrain.data.tokenizer import GPT2_SPEC, TOKENIZER_DIR, TokenizerSpec
from pretrain.data.tokens import BLOCK_MEMBER, INDEX_FORMAT, INDEX_VERSION
from pretrain.errors import UserError
from pretrain.prepare.documents import DEFAULT_TEXT_FIELD, find_input_files, input_documents
from pretrain.prepare.parallel import ordered_map
from pretrain.prepare.writer import PrepareResult, ShardWriter, writing_to

DEFAULT_CHUNK_CHARS = 2**20  # text per tokenization task: big enough to amortize the hand-off
TAR_END_BYTES = 2 * tarfile.BLOCKSIZE  # the two zero blocks that close an archive


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
    return tarfile.BLOCKSIZE + _round_up(len(_npy(np.zeros(block_len, dtype=dtype))), tarfile.BLOCKSIZE)


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


def _npy(block: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, block, allow_pickle=False)
    return buf.getvalue()


# --------------------------------------------------------------------------- preparation


def prepare_token_shards(
    documents: Iterable[str],
    output: str,
    block_len: int,
    blocks_per_shard: int,
    tokenizer: TokenizerSpec = GPT2_SPEC,
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
    shards are the same for any number of workers. Each document is [BOS] + tokens + [EOS];
    the trailing partial block is dropped and counted in the index.
    """
    _check_block_len(block_len)
    for name, value in (("workers", workers), ("chunk_chars", chunk_chars)):
        if value < 1:
            raise UserError(f"{name}={value} must be >= 1")
    enc = tokenizer.load()
    dtype = block_dtype(enc.vocab_size)
    recorded = enc.identity()  # in the fingerprint too: another tokenizer never resumes these shards
    config = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "inputs": identity,
        "tokenizer": recorded,
        "block_len": block_len,
    }
    with writing_to(output), ShardWriter(output, storage_options or {}, config, blocks_per_shard) as writer:
        if (done := writer.begin(overwrite)) is not None:
            return PrepareResult(done, written=0, skipped=len(done["shards"]), already_done=True)
        enc.write_files(writer.fs, f"{writer.root}/{TOKENIZER_DIR}")
        encode = functools.partial(_ChunkEncoder, tokenizer, dtype.str)
        chunks = ordered_map(encode, _chunk_documents(documents, chunk_chars), workers)
        with (
            contextlib.closing(chunks),
            tqdm(desc="tokens", unit="tok", unit_scale=True, disable=not progress, file=sys.stderr) as bar,
        ):
            n_docs, dropped = _pack(chunks, block_len, writer, bar)
        if writer.total_samples == 0:
            raise UserError(
                f"the input gave {dropped} tokens, fewer than one block of block_len={block_len}: "
                "add text or lower block_len (--block-len)"
            )
        index = writer.finish(
            {
                "format": INDEX_FORMAT,
                "version": INDEX_VERSION,
                "block_len": block_len,
                "dtype": dtype.name,
                "tokenizer": recorded,
                "total_blocks": writer.total_samples,
                "total_tokens": writer.total_samples * block_len,
                "dropped_tokens": dropped,
                "documents": n_docs,
                "source": source,
            }
        )
        return writer.result(index)


def write_token_shards(
    documents: Iterable[str],
    output: str,
    block_len: int,
    blocks_per_shard: int,
    tokenizer: TokenizerSpec = GPT2_SPEC,
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
        tokenizer,
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
    tokenizer: TokenizerSpec = GPT2_SPEC,
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
        tokenizer,
        storage_options,
        identity={"files": [[f.name, f.size] for f in files], "text_field": text_field},
        source="files: " + " ".join(inputs),
        workers=workers,
        chunk_chars=chunk_chars,
        overwrite=overwrite,
        progress=progress,
    )


def _pack(chunks: Iterable[tuple[np.ndarray, int]], block_len: int, writer: ShardWriter, bar: tqdm) -> tuple[int, int]:
    """Cut the token stream into whole blocks; return (documents read, tokens left over)."""
    pending: np.ndarray | None = None
    n_docs = 0
    for tokens, docs in chunks:
        n_docs += docs
        bar.update(len(tokens))
        stream = tokens if pending is None else np.concatenate([pending, tokens])
        whole = len(stream) // block_len * block_len
        for block in stream[:whole].reshape(-1, block_len):
            writer.write({BLOCK_MEMBER: _npy(block)})
        pending = stream[whole:]
    return n_docs, 0 if pending is None else len(pending)


# --------------------------------------------------------------------------- tokenization


class _ChunkEncoder:
    """Documents -> (one token array of [BOS] + tokens + [EOS] per document, how many)."""

    def __init__(self, tokenizer: TokenizerSpec, dtype: str) -> None:
        self.enc = tokenizer.load()
        self.dtype = np.dtype(dtype)

    def __call__(self, documents: list[str]) -> tuple[np.ndarray, int]:
        tokens: list[int] = []
        bos = [] if self.enc.bos_id is None else [self.enc.bos_id]
        for doc in documents:
            tokens.extend(bos)
            tokens.extend(self.enc.encode(doc))
            tokens.append(self.enc.eos_id)
        return np.array(tokens, dtype=self.dtype), len(documents)


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
