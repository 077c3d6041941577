"""The documents of a text preparation: .txt, .jsonl, .parquet and .arrow files (a directory that
Hugging Face `datasets` wrote with `save_to_disk` is read as its Arrow files, in its own order),
local or on any fsspec filesystem, found from paths, directories and glob patterns, and streamed
in a fixed order so the same inputs always give the same token stream."""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO

import fsspec
import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pretrain.data.storage import url_to_fs
from pretrain.errors import UserError

INPUT_SUFFIXES = (".txt", ".jsonl", ".parquet", ".arrow")
INPUT_KINDS = ".txt, .jsonl, .parquet or .arrow"
# What `datasets`' save_to_disk writes beside the Arrow files of one split: their order
# (state.json, "_data_files"), or, for several splits, their names (dataset_dict.json).
DATASET_STATE, DATASET_DICT = "state.json", "dataset_dict.json"
GLOB_CHARS = frozenset("*?[")
DEFAULT_TEXT_FIELD = "text"
DEFAULT_PARQUET_BATCH_ROWS = 1024
DEFAULT_READ_BYTES = 2**20


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
    if info["type"] == "directory" and fs.isfile(posixpath.join(path, DATASET_DICT)):
        splits = _read_json(fs, posixpath.join(path, DATASET_DICT)).get("splits", [])
        example = posixpath.join(path, splits[0]) if splits else f"{path}/<split>"
        raise UserError(
            f"input {path} is a datasets DatasetDict (splits: {', '.join(splits)}): pass one split's "
            f"directory, e.g. {example}"
        )
    if info["type"] == "directory" and fs.isfile(posixpath.join(path, DATASET_STATE)):
        return _saved_dataset_files(fs, path)
    if info["type"] == "directory":
        found = fs.find(path, detail=True)
        return [InputFile(fs, p, i["size"]) for p, i in sorted(found.items()) if _suffix(p) in INPUT_SUFFIXES]
    return [InputFile(fs, path, info["size"])] if _suffix(path) in INPUT_SUFFIXES else []


def _suffix(path: str) -> str:
    return posixpath.splitext(path)[1].lower()


def _read_json(fs: fsspec.AbstractFileSystem, path: str) -> dict:
    try:
        with fs.open(path, "rb") as f:
            return json.load(f)
    except ValueError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}): save the dataset again") from None


def _saved_dataset_files(fs: fsspec.AbstractFileSystem, path: str) -> list[InputFile]:
    """The Arrow files of a `save_to_disk` directory in the dataset's row order, as its state.json
    lists them (the directory may hold other .arrow files, e.g. caches, that are not rows of it)."""
    state = _read_json(fs, posixpath.join(path, DATASET_STATE))
    names = [entry.get("filename") for entry in state.get("_data_files", []) if isinstance(entry, dict)]
    if not names or None in names:
        raise UserError(f"{path}/{DATASET_STATE} lists no data files: save the dataset again with save_to_disk")
    files = []
    for name in names:
        file_path = posixpath.join(path, name)
        if not fs.isfile(file_path):
            raise UserError(f"{file_path}, listed in {path}/{DATASET_STATE}, is missing: copy the whole dataset")
        files.append(InputFile(fs, file_path, fs.info(file_path)["size"]))
    return files


def input_documents(
    files: Iterable[InputFile],
    text_field: str = DEFAULT_TEXT_FIELD,
    *,
    parquet_batch_rows: int = DEFAULT_PARQUET_BATCH_ROWS,
    read_bytes: int = DEFAULT_READ_BYTES,
) -> Iterator[str]:
    """Documents in file order: a .txt file is one, a .jsonl line or a Parquet or Arrow row is one
    (its `text_field`). Files are streamed, never read whole, except .txt (one document anyway)."""
    for file in files:
        try:
            if file.suffix == ".txt":
                yield _text_document(file)
            elif file.suffix == ".jsonl":
                yield from _jsonl_documents(file, text_field, read_bytes)
            elif file.suffix == ".arrow":
                yield from _arrow_documents(file, text_field)
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
            yield from _column_texts(parquet.iter_batches(batch_size=batch_rows, columns=[column]), column, file.name)
        except pa.ArrowException as exc:
            raise UserError(f"cannot read {file.name} as Parquet ({exc}): check or rewrite the file") from None


def _arrow_documents(file: InputFile, column: str) -> Iterator[str]:
    """The column's values from an Arrow IPC stream (what `datasets` writes), a record batch at a
    time as its writer made them."""
    with file.fs.open(file.path, "rb") as f:
        try:
            stream = pyarrow.ipc.open_stream(f)
            _check_text_column(stream.schema, column, file.name)
            yield from _column_texts(stream, column, file.name)
        except pa.ArrowException as exc:
            raise UserError(
                f"cannot read {file.name} as an Arrow stream ({exc}): save the dataset again with save_to_disk"
            ) from None


def _column_texts(batches: Iterable[pa.RecordBatch], column: str, name: str) -> Iterator[str]:
    row = 0
    for batch in batches:
        texts = batch.column(column).to_pylist()
        if None in texts:
            raise UserError(
                f"{name} row {row + texts.index(None) + 1}: column {column!r} is null: drop or fill such rows"
            )
        row += len(texts)
        yield from texts


def _check_text_column(schema: pa.Schema, column: str, name: str) -> None:
    if column not in schema.names:
        raise UserError(
            f"{name} has no column {column!r} (it has: {', '.join(schema.names)}): "
            "set --text-field to the column that holds the text"
        )
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise UserError(f"{name}: column {column!r} is {kind}, not strings: set --text-field to a text column")
