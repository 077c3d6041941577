"""Tokenize text into webdataset token-block shards for training.

    python tools/prepare_text.py corpus/ notes.txt --output s3://bucket/text --block-len 1025
    python tools/prepare_text.py --stdlib-mb 4 --output data/stdlib --block-len 1025

Each input file is one document; directories contribute their *.txt files, recursively.
Train on the result with +exp=... 'data.urls="<output>/shard-{000000..NNNNNN}.tar"'.
"""

from __future__ import annotations

import argparse
import sys

from pretrain.data.text import file_documents, find_text_files, stdlib_documents, write_token_shards
from pretrain.data.tokenizer import GPT2_NAME
from pretrain.errors import UserError

BAD_INPUT_EXIT = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="text files or directories of *.txt")
    p.add_argument("--output", required=True, help="directory or fsspec URL for the shards and index.json")
    p.add_argument("--block-len", type=int, required=True, help="tokens per block: model.seq_len + 1")
    p.add_argument("--blocks-per-shard", type=int, default=1024, help="samples per tar shard (default: 1024)")
    p.add_argument(
        "--tokenizer", default=GPT2_NAME, help="'gpt2' or a directory with encoder.json + vocab.bpe"
    )
    p.add_argument("--stdlib-mb", type=float, help="use N MB of the Python stdlib corpus instead of INPUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.stdlib_mb is not None:
            if args.inputs:
                raise UserError("give INPUT files or --stdlib-mb, not both")
            documents = stdlib_documents(int(args.stdlib_mb * 2**20))
            source = f"python stdlib corpus, {args.stdlib_mb} MB"
        else:
            documents = file_documents(find_text_files(args.inputs))
            source = "files: " + " ".join(args.inputs)
        index = write_token_shards(
            documents,
            args.output,
            args.block_len,
            args.blocks_per_shard,
            args.tokenizer,
            source=source,
            progress=not args.no_progress,
        )
    except UserError as exc:
        print(f"prepare_text: error: {exc}", file=sys.stderr)
        return BAD_INPUT_EXIT
    print(
        f"wrote {len(index['shards'])} shards, {index['total_blocks']} blocks, "
        f"{index['total_tokens']} tokens ({index['dropped_tokens']} dropped) to {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
