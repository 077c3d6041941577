"""Checkpoints under any fsspec URL: staged locally, uploaded, committed by a manifest written last.

A step is written in three moves. Every rank writes its files (the engine's native ones, its data
position and RNG) into node-local staging. Each node's leader (local rank 0) uploads its node's
files to `<url>/step_XXXXXXXX/`, hashing them as it goes, and records what it uploaded in a part
file. Rank 0 merges the parts into `MANIFEST.json` (every file with size and sha256, the step,
world size, engine, config hash): that write is the only commit point. A step without a valid
manifest does not exist, and a step whose files do not match their manifest entries is damaged,
reported by name and passed over.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from pretrain.data.storage import url_to_fs
from pretrain.errors import UserError
from pretrain.faults import crash_point

MANIFEST_NAME = "MANIFEST.json"
MANIFEST_FORMAT = "whitebox-checkpoint"
MANIFEST_VERSION = 1
PARTS_DIR = "_parts"  # per-node upload records, merged into the manifest and then removed
STEP_DIR_RE = re.compile(r"^step_(\d{8})$")
HASH_CHUNK_BYTES = 8 * 2**20
PART_POLL_S = 0.2


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


class DamagedCheckpoint(Exception):
    """A committed step whose manifest or files cannot be trusted; the message names the file."""


@dataclass(frozen=True)
class Node:
    """This process's place for uploads: its node number and whether it leads the node."""

    index: int
    count: int
    is_leader: bool


class CheckpointStore:
    def __init__(self, url: str, storage_options: dict, staging_root: str, node: Node) -> None:
        self.url = url.rstrip("/")
        self.fs, root = url_to_fs(self.url, storage_options, "checkpoint.url")
        self.root = root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)
        # A directory per node, so that "nodes" sharing a host (two slurmd on one machine, a local
        # multi-node test) or a staging_dir on a shared filesystem never mix their files.
        self.staging_root, self.node = os.path.join(staging_root, f"node{node.index}"), node

    # ------------------------------------------------------------------ writing

    def staging_dir(self, step: int) -> str:
        """This node's local directory for the step's files (every rank of the node writes here)."""
        return os.path.join(self.staging_root, step_dir_name(step))

    def uncommit(self, step: int) -> None:
        """Rank 0, before a step is saved again (a rerun after a crash): drop its old manifest, so
        that it stops counting as soon as new files may replace old ones. (Were a new file to land
        first, the old manifest's hashes would no longer match and resume would pass it over.)"""
        if self.fs.exists(self._path(step, MANIFEST_NAME)):
            self.fs.rm(self._path(step, MANIFEST_NAME))

    def probe(self) -> None:
        """Write and remove a small file at the store's root: raises what the store raises."""
        path = f"{self.root}/.write-probe-{uuid.uuid4().hex}"
        if self.is_local:
            os.makedirs(self.root, exist_ok=True)
        self.fs.pipe_file(path, b"probe")
        self.fs.rm(path)

    def discard(self, step: int) -> None:
        """Rank 0: remove an uncommitted step's files (a committed one is left alone)."""
        if self.fs.exists(self._path(step, "")) and not self.fs.exists(self._path(step, MANIFEST_NAME)):
            self.fs.rm(self._path(step, ""), recursive=True)

    def upload(self, step: int, attempt: str) -> None:
        """Node leader: upload the node's staged files, then record them in this node's part of
        this save `attempt` (parts left by an earlier, crashed attempt never count)."""
        if not self.node.is_leader:
            return
        staged = self.staging_dir(step)
        files: dict[str, dict[str, Any]] = {}
        for dirpath, _, names in os.walk(staged):
            for name in sorted(names):
                local = os.path.join(dirpath, name)
                relative = os.path.relpath(local, staged).replace(os.sep, "/")
                files[relative] = {"size": os.path.getsize(local), "sha256": _sha256_of_local(local)}
                remote = self._path(step, relative)
                if self.is_local:
                    os.makedirs(os.path.dirname(remote), exist_ok=True)
                self.fs.put_file(local, remote)
                if len(files) == 1:
                    crash_point("upload.first_file", step)
        self._write_json(self._path(step, f"{PARTS_DIR}/{attempt}/node{self.node.index}.json"), files)
        crash_point("upload.recorded", step)
        shutil.rmtree(staged, ignore_errors=True)

    def commit(self, step: int, attempt: str, record: dict[str, Any], wait_s: float) -> dict[str, Any]:
        """Rank 0: once every node's part of `attempt` is there, write the manifest (the commit point)."""
        parts = [self._path(step, f"{PARTS_DIR}/{attempt}/node{n}.json") for n in range(self.node.count)]
        deadline = time.monotonic() + wait_s
        while not all(self.fs.exists(p) for p in parts):
            if time.monotonic() > deadline:
                missing = [p for p in parts if not self.fs.exists(p)]
                raise UserError(
                    f"checkpoint step {step}: no upload record from {len(missing)} node(s) after "
                    f"{wait_s:.0f}s ({missing[0]}): a node failed to upload; the step is not committed"
                )
            time.sleep(PART_POLL_S)
            self.fs.invalidate_cache()
        files: dict[str, Any] = {}
        for part in parts:
            files.update(self._read_json(part))
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            **record,
            "step": step,
            "files": dict(sorted(files.items())),
            "committed_unix": time.time(),
        }
        crash_point("commit.before_manifest", step)
        self._write_json(self._path(step, MANIFEST_NAME), manifest)
        crash_point("commit.after_manifest", step)
        self.fs.rm(self._path(step, PARTS_DIR), recursive=True)
        return manifest

    # ------------------------------------------------------------------ reading

    def committed_steps(self) -> list[int]:
        """Steps with a manifest, oldest first (their files are checked when fetched)."""
        self.fs.invalidate_cache()
        if not self.fs.exists(self.root):
            return []
        steps = []
        for path in self.fs.ls(self.root, detail=False):
            match = STEP_DIR_RE.match(posixpath.basename(path.rstrip("/")))
            if match and self.fs.exists(self._path(int(match.group(1)), MANIFEST_NAME)):
                steps.append(int(match.group(1)))
        return sorted(steps)

    def manifest(self, step: int) -> dict[str, Any]:
        try:
            manifest = self._read_json(self._path(step, MANIFEST_NAME))
        except (OSError, ValueError) as exc:
            raise DamagedCheckpoint(f"{self.step_url(step)}/{MANIFEST_NAME} is unreadable ({exc})") from None
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict):
            raise DamagedCheckpoint(f"{self.step_url(step)}/{MANIFEST_NAME} is not a {MANIFEST_FORMAT} manifest")
        return manifest

    def fetch(self, step: int, progress: Callable[[int], None] | None = None) -> str:
        """A local directory holding the step's files, each checked against the manifest.

        A local store is checked in place; a remote one is downloaded into staging first.
        `progress(n)` is told the bytes of each file once it is verified.
        """
        files = self.manifest(step)["files"]
        if self.is_local:
            directory = self._path(step, "")
        else:
            directory = os.path.join(self.staging_root, "restore", step_dir_name(step))
            shutil.rmtree(directory, ignore_errors=True)
        for relative, entry in files.items():
            local = os.path.join(directory, relative)
            if not self.is_local:
                os.makedirs(os.path.dirname(local), exist_ok=True)
                try:
                    self.fs.get_file(self._path(step, relative), local)
                except FileNotFoundError:
                    raise DamagedCheckpoint(f"{self.step_url(step)}/{relative} is missing") from None
                except OSError as exc:
                    raise DamagedCheckpoint(f"{self.step_url(step)}/{relative} cannot be read ({exc})") from None
            self._verify(step, relative, local, entry)
            if progress is not None:
                progress(entry["size"])
        return directory

    def step_url(self, step: int) -> str:
        return f"{self.url}/{step_dir_name(step)}"

    # ------------------------------------------------------------------ retention

    def retain(self, keep_last: int, keep_every: int) -> list[int]:
        """Delete committed steps beyond the newest `keep_last`, except multiples of `keep_every`
        (0: none kept for good), and unfinished steps older than the newest committed one.
        The newest committed step is always kept; returns the deleted steps."""
        committed = self.committed_steps()
        if not committed:
            return []
        keep = set(committed[-max(1, keep_last) :])
        keep.update(s for s in committed if keep_every and s % keep_every == 0)
        doomed = [s for s in committed if s not in keep]
        for path in self.fs.ls(self.root, detail=False):
            match = STEP_DIR_RE.match(posixpath.basename(path.rstrip("/")))
            if match and int(match.group(1)) not in committed and int(match.group(1)) < committed[-1]:
                doomed.append(int(match.group(1)))  # a save that never committed
        for step in doomed:
            # The manifest goes first: from then on the step is not committed, whatever remains.
            if self.fs.exists(self._path(step, MANIFEST_NAME)):
                self.fs.rm(self._path(step, MANIFEST_NAME))
            self.fs.rm(self._path(step, ""), recursive=True)
        return sorted(doomed)

    # ------------------------------------------------------------------ helpers

    def _path(self, step: int, relative: str) -> str:
        return f"{self.root}/{step_dir_name(step)}" + (f"/{relative}" if relative else "")

    def _verify(self, step: int, relative: str, local: str, entry: dict[str, Any]) -> None:
        where = f"{self.step_url(step)}/{relative}"
        if not os.path.isfile(local):
            raise DamagedCheckpoint(f"{where} is missing")
        if os.path.getsize(local) != entry["size"]:
            raise DamagedCheckpoint(f"{where} has {os.path.getsize(local)} bytes, the manifest says {entry['size']}")
        if _sha256_of_local(local) != entry["sha256"]:
            raise DamagedCheckpoint(f"{where} does not match its sha256 in the manifest")

    def _write_json(self, path: str, obj: dict) -> None:
        """Whole or not at all: an object store PUT is atomic; a local file is renamed into place."""
        data = json.dumps(obj, indent=1, sort_keys=True).encode()
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def _read_json(self, path: str) -> dict:
        return json.loads(self.fs.cat_file(path))


def _sha256_of_local(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
