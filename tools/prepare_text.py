"""Tokenize text into webdataset token-block shards for training.

    python tools/prepare_text.py corpus/ extra.jsonl --output s3://bucket/text --block-len 1025
    python tools/prepare_text.py 's3://bucket/raw/*.parquet' --storage-option endpoint_url=http://minio:9000 \\
        --output s3://bucket/text --block-len 1025 --workers 16
    python tools/prepare_text.py --stdlib-mb 4 --output data/stdlib --block-len 1025
    python tools/prepare_text.py corpus/ --tokenizer my-tok/tokenizer.json --output data/mine --block-len 1025

INPUTs are local paths or fsspec URLs: files, directories (searched recursively) or glob
patterns. A .txt file is one document; a .jsonl line and a .parquet or .arrow row are one document
each, the text taken from --text-field. A directory written by Hugging Face datasets'
`save_to_disk` (one split) is read as its Arrow files, in the dataset's row order. Re-running the
same command resumes an interrupted run: finished shards are kept, not rewritten. Each document
becomes [BOS, if the tokenizer has one] + its tokens + [EOS]; the tokenizer's files are copied to
OUTPUT/tokenizer/ and index.json records its identity (name, kind, vocab_size, sha256, eos, bos).
Train on the result with +exp=... 'data.urls="<output>/shard-{000000..NNNNNN}.tar"' and
model.vocab_size at least the tokenizer's vocab_size.
"""

from __future__ import annotations

import argparse
import os
import sys

from pretrain.data.storage import add_storage_option_flag, parse_storage_options
from pretrain.data.tokenizer import GPT2_NAME, HF_BOS_TOKENS, HF_EOS_TOKENS, TokenizerSpec
from pretrain.errors import UserError
from pretrain.prepare.documents import DEFAULT_TEXT_FIELD
from pretrain.prepare.embedded import stdlib_documents
from pretrain.prepare.text import (
    DEFAULT_CHUNK_CHARS,
    block_dtype,
    blocks_per_shard_for,
    prepare_text_files,
    prepare_token_shards,
)
from pretrain.prepare.writer import PrepareResult

BAD_INPUT_EXIT = 2
DEFAULT_SHARD_SIZE_MB = 256
MB = 2**20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help=".txt/.jsonl/.parquet/.arrow files, directories (a datasets save_to_disk split too) or glob "
        "patterns; local or fsspec URLs",
    )
    p.add_argument("--output", required=True, help="directory or fsspec URL for the shards and index.json")
    p.add_argument("--block-len", type=int, required=True, help="tokens per block: model.seq_len + 1")
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--shard-size-mb",
        type=float,
        default=DEFAULT_SHARD_SIZE_MB,
        help=f"largest shard size, cut at whole blocks (default: {DEFAULT_SHARD_SIZE_MB})",
    )
    size.add_argument("--blocks-per-shard", type=int, help="blocks per shard, instead of --shard-size-mb")
    p.add_argument(
        "--text-field",
        default=DEFAULT_TEXT_FIELD,
        help=f"the .jsonl field / .parquet or .arrow column holding the text (default: {DEFAULT_TEXT_FIELD})",
    )
    p.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes (default: the number of CPUs)"
    )
    p.add_argument(
        "--chunk-chars",
        type=int,
        default=DEFAULT_CHUNK_CHARS,
        help=f"characters of text per tokenization task (default: {DEFAULT_CHUNK_CHARS})",
    )
    add_storage_option_flag(p)
    p.add_argument(
        "--tokenizer",
        default=GPT2_NAME,
        help="'gpt2' (default), a Hugging Face tokenizer.json (or its directory), a SentencePiece .model file, or "
        "a directory with GPT-2-style encoder.json + vocab.bpe; its files are copied to OUTPUT/tokenizer/",
    )
    p.add_argument(
        "--eos-token",
        help="the token that ends each document (default: SentencePiece's own, GPT-2's <|endoftext|>, or the "
        f"first added token of a tokenizer.json among {' '.join(HF_EOS_TOKENS)})",
    )
    p.add_argument(
        "--bos-token",
        help="the token that starts each document, '' for none (default: SentencePiece's own, none for GPT-2, "
        f"or the first added token of a tokenizer.json among {' '.join(HF_BOS_TOKENS)})",
    )
    p.add_argument("--stdlib-mb", type=float, help="use N MB of the Python stdlib corpus instead of INPUT")
    p.add_argument(
        "--overwrite", action="store_true", help="replace what another preparation left at --output instead of stopping"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p.parse_args(argv)


def blocks_per_shard(args: argparse.Namespace, tokenizer: TokenizerSpec) -> int:
    if args.blocks_per_shard is not None:
        return args.blocks_per_shard
    dtype = block_dtype(tokenizer.load().vocab_size)
    return blocks_per_shard_for(int(args.shard_size_mb * MB), args.block_len, dtype)


def prepare(args: argparse.Namespace) -> PrepareResult:
    tokenizer = TokenizerSpec(args.tokenizer, args.eos_token, args.bos_token)
    common = dict(
        output=args.output,
        block_len=args.block_len,
        blocks_per_shard=blocks_per_shard(args, tokenizer),
        tokenizer=tokenizer,
        storage_options=parse_storage_options(args.storage_option),
        workers=args.workers,
        chunk_chars=args.chunk_chars,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    if args.stdlib_mb is None:
        return prepare_text_files(args.inputs, text_field=args.text_field, **common)
    if args.inputs:
        raise UserError("give INPUT files or --stdlib-mb, not both")
    n_bytes = int(args.stdlib_mb * MB)
    return prepare_token_shards(
        stdlib_documents(n_bytes),
        identity={"stdlib_bytes": n_bytes, "python": sys.version},
        source=f"python stdlib corpus, {args.stdlib_mb} MB",
        **common,
    )


def summary(result: PrepareResult, output: str) -> str:
    index = result.index
    return result.summary(
        output, f"{index['total_blocks']} blocks, {index['total_tokens']} tokens ({index['dropped_tokens']} dropped)"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = prepare(args)
    except UserError as exc:
        print(f"prepare_text: error: {exc}", file=sys.stderr)
        return BAD_INPUT_EXIT
    print(summary(result, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
