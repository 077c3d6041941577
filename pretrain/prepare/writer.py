"""The one shard writer every preparation uses: numbered samples into tar shards, resumably.

A sample is a dict of member extension -> bytes; the writer knows nothing of what the bytes
are. Each shard is written under a temporary name, moved into place when complete, and recorded
with the sha256 of its samples in `_progress.json`, beside a fingerprint of everything that
decides the shards' content (the caller's `config`: inputs, settings, format). The index is
written last, so an output without it is unfinished.

A re-run with the same fingerprint resumes after the finished shards, in one of two ways:
- a source that can seek (images: one file per sample) calls `skip_finished()` and starts its
  samples at `resume_at`; nothing finished is read again;
- a source that cannot (text: a shard's blocks depend on all the text before it) writes every
  sample again; the finished shards' samples are hashed instead of written, and must hash as
  recorded, or the inputs changed under the run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from webdataset import TarWriter

from pretrain.data.storage import INDEX_NAME, KEY_PATTERN, SHARD_PATTERN, TAR_MTIME, url_to_fs
from pretrain.errors import UserError

# In every fingerprint: bump when the same samples would give other shard bytes or hashes, so an
# interrupted run of older code is not resumed by this one.
WRITER_VERSION = 2
PROGRESS_NAME = "_progress.json"
SHARD_GLOB = "shard-*.tar*"  # SHARD_PATTERN's files, finished or partial
PARTIAL_SUFFIX = ".partial"  # a file being written; never matched by a shard brace pattern
SHARD_RECORD_KEYS = frozenset({"name", "samples", "sha256"})


@dataclass(frozen=True)
class PrepareResult:
    """What a run did: the index, shards it wrote, shards an earlier run had finished, and
    whether the output was complete before it started."""

    index: dict
    written: int
    skipped: int
    already_done: bool = False

    def summary(self, output: str, totals: str) -> str:
        """The line a preparation tool ends with; `totals` says what the shards hold."""
        if self.already_done:
            return f"{output} was already complete: {len(self.index['shards'])} shards, {totals}; nothing to do"
        return f"wrote {self.written} shards ({self.skipped} finished earlier, skipped), {totals} to {output}"


@contextlib.contextmanager
def writing_to(output: str) -> Iterator[None]:
    """A storage failure while preparing `output` as one line naming it."""
    try:
        yield
    except OSError as exc:
        raise UserError(
            f"cannot write shards to {output} ({type(exc).__name__}: {exc}): check the path, permissions "
            "and storage options"
        ) from None


class ShardWriter:
    """Writes samples under numbered keys into `samples_per_shard`-sample shards at `output`.

    Use: `begin()` (the finished index, or None and the resume point), `write()` each sample
    (from `resume_at` after `skip_finished()`), then `finish()`; as a context manager, an error
    leaves the current shard a partial file, which the next run rewrites.
    """

    def __init__(self, output: str, storage_options: dict, config: dict, samples_per_shard: int) -> None:
        if samples_per_shard < 1:
            raise UserError(f"samples per shard = {samples_per_shard} must be >= 1")
        self.url, self.samples_per_shard = output.rstrip("/"), samples_per_shard
        self.config = {**config, "writer": WRITER_VERSION, "samples_per_shard": samples_per_shard}
        self.fingerprint = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode()).hexdigest()
        self.fs, root = url_to_fs(output, storage_options, "output")
        self.root = root.rstrip("/")
        self.finished: list[dict] = []  # shards an earlier run of this preparation completed
        self.shards: list[dict[str, Any]] = []  # shards of this stream so far: name, samples, sha256
        self.total_samples = 0
        self.written = 0
        self._hash: Any = None  # the current shard's, None before its first sample
        self._samples = 0
        self._file: Any = None
        self._tar: TarWriter | None = None

    # ----------------------------------------------------------------- the run

    def begin(self, overwrite: bool = False) -> dict | None:
        """The index if this preparation is already complete; else None, with `finished` set to
        the shards an earlier run of it completed. Anything else at the output is an error
        unless `overwrite`."""
        self.fs.makedirs(self.root, exist_ok=True)
        self.fs.invalidate_cache(self.root)  # another process (or run) may have changed it
        if overwrite:
            self._clear()
        elif (index := self._read_json(INDEX_NAME)) is not None:
            self._check_fingerprint(index, INDEX_NAME)
            return index
        elif (progress := self._read_json(PROGRESS_NAME)) is not None:
            self._check_fingerprint(progress, PROGRESS_NAME)
            self.finished = self._still_present(self._finished_shards(progress))
            return None
        elif self.fs.glob(self._path(SHARD_GLOB)):
            raise UserError(
                f"{self.url} holds shard files but no {INDEX_NAME} or {PROGRESS_NAME}: they are not from "
                "an unfinished run of this tool; write to a new output, or pass --overwrite to replace them"
            )
        self._record()
        return None

    @property
    def resume_at(self) -> int:
        """Samples in the finished shards: where a seekable source starts after `skip_finished`."""
        return sum(s["samples"] for s in self.finished)

    def skip_finished(self) -> None:
        """Take the finished shards as they are; the caller's samples start at `resume_at`."""
        self.shards = list(self.finished)
        self.total_samples = self.resume_at

    def write(self, members: dict[str, bytes]) -> None:
        if self._hash is None or self._samples == self.samples_per_shard:
            self._finish_current()
            self._start_next()
        for ext in sorted(members):
            data = members[ext]
            self._hash.update(f"{ext}\0{len(data)}\0".encode())
            self._hash.update(data)
        if self._tar is not None:
            self._tar.write({"__key__": KEY_PATTERN.format(self.total_samples), **members})
        self._samples += 1
        self.total_samples += 1

    def finish(self, fields: dict) -> dict:
        """Complete the last shard and write the index: `fields`, then the shard list, the total
        and the fingerprint. Returns the index."""
        self._finish_current()
        if len(self.shards) < len(self.finished):
            raise self._inputs_changed(self.finished[len(self.shards)]["name"])
        index = {
            **fields,
            "shards": [{"name": s["name"], "samples": s["samples"]} for s in self.shards],
            "total_samples": self.total_samples,
            "fingerprint": self.fingerprint,
        }
        self._write_json(INDEX_NAME, index)
        self.fs.rm(self._path(PROGRESS_NAME))
        return index

    def result(self, index: dict) -> PrepareResult:
        return PrepareResult(index, written=self.written, skipped=len(self.shards) - self.written)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        """After an error the current shard stays a partial file (rewritten by the next run)."""
        self._close_files()

    # ----------------------------------------------------------------- shards

    def _start_next(self) -> None:
        self._hash, self._samples = hashlib.sha256(), 0
        number = len(self.shards)
        if number >= len(self.finished):
            self._file = self.fs.open(self._path(SHARD_PATTERN.format(number) + PARTIAL_SUFFIX), "wb")
            self._tar = TarWriter(self._file, encoder=False, mtime=TAR_MTIME)

    def _finish_current(self) -> None:
        if self._hash is None:
            return
        name = SHARD_PATTERN.format(len(self.shards))
        shard = {"name": name, "samples": self._samples, "sha256": self._hash.hexdigest()}
        self._hash = None
        if self._tar is None:  # re-derived, not written: it must be the shard the earlier run finished
            if shard != self.finished[len(self.shards)]:
                raise self._inputs_changed(name)
            self.shards.append(shard)
            return
        self._close_files()
        self.fs.mv(self._path(name + PARTIAL_SUFFIX), self._path(name))
        self.shards.append(shard)
        self.written += 1
        self._record()

    def _inputs_changed(self, name: str) -> UserError:
        return UserError(
            f"{self.url}/{name} was finished by an earlier run, but the inputs now give other samples "
            "for it: the inputs changed; pass --overwrite to prepare them afresh"
        )

    def _close_files(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._file.close()
            self._tar = self._file = None

    # ----------------------------------------------------------------- the output's records

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _record(self) -> None:
        """The progress file: which shards are complete, for this fingerprint."""
        record = {"fingerprint": self.fingerprint, "config": self.config, "shards": self.shards}
        self._write_json(PROGRESS_NAME, record)

    def _check_fingerprint(self, record: dict, name: str) -> None:
        if record.get("fingerprint") != self.fingerprint:
            raise UserError(
                f"{self.url}/{name} is from a different preparation (other inputs or settings, or an older "
                "version of this tool): write to a new output, or pass --overwrite to replace it"
            )

    def _finished_shards(self, progress: dict) -> list[dict]:
        shards = progress.get("shards")
        if not (
            isinstance(shards, list) and all(isinstance(s, dict) and s.keys() == SHARD_RECORD_KEYS for s in shards)
        ):
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
        """Remove what this writer writes, and nothing else the directory may hold."""
        found = [
            p
            for pattern in (SHARD_GLOB, INDEX_NAME + "*", PROGRESS_NAME + "*")
            for p in self.fs.glob(self._path(pattern))
        ]
        if found:
            self.fs.rm(found)

    def _read_json(self, name: str) -> dict | None:
        path = self._path(name)
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
        partial = self._path(name + PARTIAL_SUFFIX)
        with self.fs.open(partial, "w") as f:
            json.dump(data, f, indent=1)
        self.fs.mv(partial, self._path(name))
