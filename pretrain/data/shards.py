"""Endless, resumable samples from webdataset shards on any fsspec URL, for any sample kind.

Every DataLoader worker of every rank is one *reader*. Each epoch, all shards are put in an
order drawn from (seed, epoch) and reader r of R takes every R-th: no sample is read twice or
missed in an epoch, and ranks never run out of data at different times (the caller stops on a
step count). Within a shard, samples are shuffled in windows of `shuffle_buffer`, each window by
its own seeded permutation, so a position (epoch, shard, sample) fixes everything that follows:
the reader's state is that position, and a restart replays exactly. webdataset contributes its
tar iterator; it has neither an s3 scheme nor resumable state, so opening streams (through
fsspec, with retries) and positions are kept here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import random
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from typing import Any

import braceexpand
import fsspec
import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from pretrain.errors import UserError

INDEX_NAME = "index.json"
STATE_VERSION = 2
ON_ERROR = ("raise", "skip")
log = logging.getLogger("pretrain")

# decode(raw webdataset sample, shard url, seed for any randomness) -> training sample. The seed is
# drawn from (seed, epoch, shard, slot), so a sample is decoded the same way on every run.
Decoder = Callable[[dict, str, int], dict[str, Any]]


def expand_urls(urls: str | Iterable[str]) -> list[str]:
    """`data.urls` as a flat list: brace patterns expanded in a string or in each list item."""
    items = [urls] if isinstance(urls, str) else list(urls)
    expanded = [u.strip() for item in items for u in braceexpand.braceexpand(str(item))]
    expanded = [u for u in expanded if u]
    if not expanded:
        raise UserError(f"data.urls={urls!r} gives no shard URL: set it to a brace pattern or a list of shard URLs")
    return expanded


def read_index(urls: list[str], storage_options: dict, formats: tuple[str, ...], hint: str) -> dict:
    """The `index.json` beside the shards, after checking its format and that it lists every shard."""
    directory = posixpath.dirname(urls[0])
    path = posixpath.join(directory, INDEX_NAME)
    try:
        with fsspec.open(path, "r", **storage_options) as f:
            index = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path} not found: the shard set is missing or unfinished; {hint}") from None
    except (OSError, ValueError, ImportError) as exc:
        raise UserError(f"cannot read {path} ({type(exc).__name__}: {exc}); {hint}") from None
    if not (isinstance(index, dict) and index.get("format") in formats and isinstance(index.get("shards"), list)
            and all(isinstance(s, dict) and {"name", "samples"} <= s.keys() for s in index["shards"])):
        raise UserError(f"{path} is not a {' or '.join(formats)} index; {hint}")
    listed = {s["name"] for s in index["shards"]}
    for url in urls:
        if posixpath.dirname(url) != directory:
            raise UserError(f"shard {url} is not in {directory}, the directory of the first shard: "
                            "data.urls must name one shard set")
        if posixpath.basename(url) not in listed:
            raise UserError(f"shard {url} is not listed in {path}: fix data.urls or {hint}")
    return index


@dataclass(frozen=True)
class StreamOptions:
    """How a ShardStream reads: the data.* knobs that are not about what the samples are."""

    seed: int
    shuffle_buffer: int = 1
    retries: int = 3
    retry_backoff_s: float = 1.0
    on_error: str = "raise"


@dataclass
class _Position:
    """The next sample of this reader: an epoch, a place in its shard order, a slot in the shard."""

    epoch: int = 0
    shard_pos: int = 0
    sample: int = 0


class _ShardError(Exception):
    """A shard that cannot be read (after retries): missing, truncated, not a tar."""


class ShardStream(IterableDataset):
    """Decoded samples of one rank, split again over this process's DataLoader workers.

    `num_workers` must be the DataLoader's, so that the split is known before any worker starts
    (and too few shards are an error at once, not a hang). `state_dict` / `load_state_dict` run
    inside each worker under torchdata's StatefulDataLoader, which keeps one state per worker.
    """

    def __init__(self, urls: list[str], samples_per_shard: dict[str, int], decode: Decoder, *,
                 rank: int, world_size: int, num_workers: int, options: StreamOptions,
                 storage_options: dict | None = None) -> None:
        if options.on_error not in ON_ERROR:
            raise UserError(f"data.on_error={options.on_error!r} is not one of {', '.join(ON_ERROR)}")
        readers = world_size * max(1, num_workers)
        if len(urls) < readers:
            raise UserError(f"data.urls gives {len(urls)} shards for {world_size} ranks x {max(1, num_workers)} "
                            f"loader workers: every reader needs one; write more, smaller shards or lower "
                            f"data.num_workers")
        self.urls, self.samples_per_shard, self.decode = urls, samples_per_shard, decode
        self.rank, self.world_size, self.num_workers = rank, world_size, max(1, num_workers)
        self.options = options
        self.storage_options = dict(storage_options or {})
        self._pos = _Position()
        self.skipped = 0

    @property
    def reader(self) -> int:
        info = get_worker_info()
        return self.rank * self.num_workers + (info.id if info else 0)

    @property
    def readers(self) -> int:
        return self.world_size * self.num_workers

    def epoch_order(self, epoch: int) -> list[str]:
        """This reader's shards in the order epoch `epoch` reads them."""
        order = list(self.urls)
        random.Random(self.options.seed + epoch).shuffle(order)
        return order[self.reader::self.readers]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        pos = self._pos
        while True:
            shards = self.epoch_order(pos.epoch)
            while pos.shard_pos < len(shards):
                url = shards[pos.shard_pos]
                try:
                    yield from self._shard(url, pos)
                except _ShardError as exc:
                    self._fail(url, None, str(exc), lost=self.samples_per_shard[url] - pos.sample)
                pos.shard_pos, pos.sample = pos.shard_pos + 1, 0
            pos.epoch, pos.shard_pos = pos.epoch + 1, 0

    def _shard(self, url: str, pos: _Position) -> Iterator[dict[str, torch.Tensor]]:
        """The shard's samples from slot `pos.sample` on, advancing it as each slot is taken."""
        window_size = max(1, self.options.shuffle_buffer)
        window_index = pos.sample // window_size
        raw = self._raw_samples(url, window_index * window_size)
        while window := list(islice(raw, window_size)):
            order = list(range(len(window)))
            salt = f"{self.options.seed}:{pos.epoch}:{url}:{window_index}"
            random.Random(salt).shuffle(order)
            for slot in range(pos.sample - window_index * window_size, len(window)):
                pos.sample += 1
                raw_index = window_index * window_size + order[slot]
                sample = self._decode(window[order[slot]], url, f"{salt}:{raw_index}")
                if sample is not None:
                    yield sample
            window_index += 1

    def _raw_samples(self, url: str, start: int) -> Iterator[dict]:
        """Undecoded samples from index `start` on. A transient read error reopens the shard and
        goes on from the first sample not yet delivered, `retries` times with doubling backoff."""
        delivered, attempt = start, 0
        while True:
            try:
                with fsspec.open(url, "rb", **self.storage_options) as stream:
                    files = ({**f, "__url__": url} for f in tar_file_iterator(stream))
                    for i, sample in enumerate(group_by_keys(files)):
                        if i >= delivered:
                            delivered += 1
                            yield sample
                return
            except (FileNotFoundError, PermissionError) as exc:
                raise _ShardError(f"{type(exc).__name__}: {exc}") from None
            except OSError as exc:
                attempt += 1
                if attempt > self.options.retries:
                    raise _ShardError(f"{type(exc).__name__} after {self.options.retries} retries: {exc}") from None
                log.warning("reading shard %s failed (%s); retry %d/%d", url, exc, attempt, self.options.retries)
                time.sleep(self.options.retry_backoff_s * 2 ** (attempt - 1))
            except (tarfile.TarError, EOFError, ValueError, KeyError) as exc:
                raise _ShardError(f"{type(exc).__name__}: {exc}") from None

    def _decode(self, sample: dict, url: str, salt: str) -> dict[str, Any] | None:
        sample_seed = int.from_bytes(hashlib.blake2b(salt.encode(), digest_size=8).digest()) >> 1  # 63 bits
        try:
            return self.decode(sample, url, sample_seed)
        except UserError as exc:
            self._fail(url, sample.get("__key__"), str(exc), lost=1)
            return None

    def _fail(self, url: str, key: str | None, cause: str, lost: int) -> None:
        """on_error=raise: one line naming the shard (and member); skip: count and go on."""
        where = f"shard {url}" + (f" member {key}" if key else "")
        if self.options.on_error == "raise":
            raise UserError(f"cannot read {where} ({' '.join(cause.split())}): re-create it, or set "
                            "data.on_error=skip to count and skip bad samples")
        self.skipped += lost
        log.warning("skipped %d sample(s) of %s: %s", lost, where, " ".join(cause.split()))

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position of this reader's next sample, and what it was cut from."""
        return {"version": STATE_VERSION, **asdict(self._pos), "skipped": self.skipped,
                "reader": self.reader, "readers": self.readers, "num_shards": len(self.urls),
                "seed": self.options.seed, "shuffle_buffer": self.options.shuffle_buffer}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the reader that saved `state` stopped.

        A checkpoint from another world size or worker count is refused rather than re-split:
        the readers' positions cannot be mapped onto a different split without repeating or
        skipping samples of the current epoch.
        """
        expected = {"version": STATE_VERSION, "reader": self.reader, "readers": self.readers,
                    "num_shards": len(self.urls), "seed": self.options.seed,
                    "shuffle_buffer": self.options.shuffle_buffer}
        changed = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if changed:
            detail = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
            raise UserError(f"the data changed since the checkpoint ({detail}): resume with the same shards, "
                            "ranks, data.num_workers, seed and data.shuffle_buffer, or start a new run")
        self._pos = _Position(state["epoch"], state["shard_pos"], state["sample"])
        self.skipped = state["skipped"]
