"""Endless, resumable batches of token blocks from webdataset shards on any fsspec URL.

Each rank reads its own fixed subset of shards, epoch after epoch, and the caller stops on a
step count: ranks never run out of data at different times, which would hang the next
collective. webdataset has neither an s3 scheme nor resumable state, so streams are opened with
fsspec here and handed to its tar iterator, and the position in the data is kept here.
"""

from __future__ import annotations

import io
import json
import posixpath
import random
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import braceexpand
import fsspec
import numpy as np
import torch
from webdataset.tariterators import group_by_keys, tar_file_iterator

from pretrain.data.text import BLOCK_MEMBER, INDEX_FORMAT, INDEX_NAME, INDEX_VERSION
from pretrain.errors import UserError

PREPARE_HINT = "create the shards with `python tools/prepare_text.py`"
STATE_VERSION = 1
BLOCK_DTYPES = ("uint16", "uint32")


def expand_urls(urls: str | Iterable[str]) -> list[str]:
    """`data.urls` as a flat list: brace patterns expanded in a string or in each list item."""
    items = [urls] if isinstance(urls, str) else list(urls)
    expanded = [u.strip() for item in items for u in braceexpand.braceexpand(str(item))]
    expanded = [u for u in expanded if u]
    if not expanded:
        raise UserError(
            f"data.urls={urls!r} gives no shard URL: set it to a brace pattern or a list of shard URLs"
        )
    return expanded


def read_index(urls: list[str], storage_options: dict | None = None) -> dict:
    """The `index.json` beside the shards, after checking that it lists every shard in `urls`."""
    directory = posixpath.dirname(urls[0])
    path = posixpath.join(directory, INDEX_NAME)
    try:
        with fsspec.open(path, "r", **(storage_options or {})) as f:
            index = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path} not found: the shard set is missing or unfinished; {PREPARE_HINT}") from None
    except (OSError, ValueError, ImportError) as exc:
        raise UserError(f"cannot read {path} ({type(exc).__name__}: {exc}); {PREPARE_HINT}") from None
    _check_index(index, path)
    listed = {s["name"] for s in index["shards"]}
    for url in urls:
        if posixpath.dirname(url) != directory:
            raise UserError(
                f"shard {url} is not in {directory}, the directory of the first shard: "
                "data.urls must name one shard set"
            )
        if posixpath.basename(url) not in listed:
            raise UserError(f"shard {url} is not listed in {path}: fix data.urls or {PREPARE_HINT}")
    return index


def _check_index(index: Any, path: str) -> None:
    ok = (
        isinstance(index, dict)
        and index.get("format") == INDEX_FORMAT
        and index.get("version") == INDEX_VERSION
        and isinstance(index.get("block_len"), int)
        and index.get("dtype") in BLOCK_DTYPES
        and isinstance(index.get("shards"), list)
        and all(isinstance(s, dict) and {"name", "samples"} <= s.keys() for s in index["shards"])
    )
    if not ok:
        raise UserError(f"{path} is not a {INDEX_FORMAT} v{INDEX_VERSION} index; {PREPARE_HINT}")


@dataclass
class _Position:
    """Where the next sample comes from: an epoch, a place in its shard order, a sample in the shard."""

    epoch: int = 0
    shard_pos: int = 0
    sample: int = 0


class TokenBlockStream:
    """Endless `{"input_ids", "labels"}` batches of `(batch_size, seq_len)` int64 for one rank.

    Rank r reads shards[r::world_size]. Each epoch visits them in an order shuffled by
    `random.Random(seed + epoch)` and reads each shard's samples in order, so the stream is the
    same on every run and `state_dict()` pins it to a sample. Iterate one iterator at a time:
    each `iter()` continues from the current position.
    """

    def __init__(
        self,
        urls: str | Iterable[str],
        *,
        seq_len: int,
        vocab_size: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        storage_options: dict | None = None,
    ) -> None:
        if batch_size < 1:
            raise UserError(f"batch_size={batch_size} must be >= 1: set train.micro_batch_size")
        if not 0 <= rank < world_size:
            raise UserError(
                f"rank {rank} is outside world_size {world_size}: check the launcher's RANK/WORLD_SIZE"
            )
        all_urls = expand_urls(urls)
        self._storage_options = dict(storage_options or {})
        index = read_index(all_urls, self._storage_options)
        if index["block_len"] != seq_len + 1:
            raise UserError(
                f"the shards hold blocks of block_len={index['block_len']} tokens but "
                f"model.seq_len={seq_len} needs {seq_len + 1}: set model.seq_len={index['block_len'] - 1} "
                f"or re-run tools/prepare_text.py with --block-len {seq_len + 1}"
            )
        shard_vocab = index.get("tokenizer", {}).get("vocab_size", 0)
        if shard_vocab > vocab_size:
            raise UserError(
                f"the shards were tokenized with a {shard_vocab}-token vocabulary but "
                f"model.vocab_size={vocab_size}: set model.vocab_size >= {shard_vocab}"
            )
        if len(all_urls) < world_size:
            raise UserError(
                f"data.urls gives {len(all_urls)} shards for {world_size} ranks: every rank needs one; "
                "write more, smaller shards (data.blocks_per_shard or --blocks-per-shard) or use fewer ranks"
            )
        self._urls = all_urls[rank::world_size]
        samples = {s["name"]: s["samples"] for s in index["shards"]}
        if sum(samples[posixpath.basename(u)] for u in self._urls) == 0:
            raise UserError(f"the shards of rank {rank} hold no samples: {PREPARE_HINT}")
        self._seq_len, self._batch_size = seq_len, batch_size
        self._rank, self._world_size, self._seed = rank, world_size, seed
        self._n_shards = len(all_urls)
        self._dtype = np.dtype(index["dtype"])
        self._pos = _Position()

    @property
    def shard_urls(self) -> list[str]:
        """This rank's shards, in index order."""
        return list(self._urls)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        batch: list[np.ndarray] = []
        for block in self._blocks():
            batch.append(block)
            if len(batch) == self._batch_size:
                tokens = torch.from_numpy(np.stack(batch).astype(np.int64))
                batch = []
                yield {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}

    def _blocks(self) -> Iterator[np.ndarray]:
        """Blocks from the current position on, advancing it as each block is taken."""
        pos = self._pos
        while True:
            order = self.epoch_order(pos.epoch)
            while pos.shard_pos < len(order):
                url = order[pos.shard_pos]
                for i, block in enumerate(self._read_shard(url)):
                    if i >= pos.sample:
                        pos.sample += 1
                        yield block
                pos.shard_pos, pos.sample = pos.shard_pos + 1, 0
            pos.epoch, pos.shard_pos = pos.epoch + 1, 0

    def epoch_order(self, epoch: int) -> list[str]:
        """This rank's shards in the order epoch `epoch` reads them."""
        order = list(self._urls)
        random.Random(self._seed + epoch).shuffle(order)
        return order

    def _read_shard(self, url: str) -> Iterator[np.ndarray]:
        """The shard's blocks in order; any read or decode failure names the shard."""
        try:
            with fsspec.open(url, "rb", **self._storage_options) as stream:
                files = ({**f, "__url__": url} for f in tar_file_iterator(stream))
                for sample in group_by_keys(files):
                    yield self._decode(sample, url)
        except UserError:
            raise
        except (OSError, tarfile.TarError, ValueError, EOFError, KeyError) as exc:
            cause = " ".join(f"{type(exc).__name__}: {exc}".split())
            raise UserError(
                f"cannot read shard {url} ({cause}): re-create it with tools/prepare_text.py"
            ) from None

    def _decode(self, sample: dict, url: str) -> np.ndarray:
        key = sample["__key__"]
        if BLOCK_MEMBER not in sample:
            raise UserError(f"sample {key} in shard {url} has no .{BLOCK_MEMBER} member: {PREPARE_HINT}")
        block = np.load(io.BytesIO(sample[BLOCK_MEMBER]), allow_pickle=False)
        if block.dtype != self._dtype or block.shape != (self._seq_len + 1,):
            raise UserError(
                f"sample {key} in shard {url} is {block.dtype}{list(block.shape)}, the index says "
                f"{self._dtype}[{self._seq_len + 1}]: the shard and index.json are from different runs; "
                + PREPARE_HINT
            )
        return block

    def state_dict(self) -> dict:
        """JSON-serialisable position of the next sample after the last batch yielded."""
        return {
            "version": STATE_VERSION,
            **asdict(self._pos),
            "num_shards": self._n_shards,
            "world_size": self._world_size,
            "rank": self._rank,
            "seed": self._seed,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the stream that saved `state` stopped."""
        if not isinstance(state, dict):
            raise UserError(f"data state {state!r} is not a dict: the checkpoint is damaged")
        expected = {
            "version": STATE_VERSION,
            "num_shards": self._n_shards,
            "world_size": self._world_size,
            "rank": self._rank,
            "seed": self._seed,
        }
        changed = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if changed:
            detail = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
            raise UserError(
                f"the data changed since the checkpoint ({detail}): resume with the same data, "
                "world size and seed, or start a new run"
            )
        try:
            pos = _Position(int(state["epoch"]), int(state["shard_pos"]), int(state["sample"]))
        except (KeyError, TypeError, ValueError):
            raise UserError(
                f"data state {state!r} is not a TokenBlockStream position: the checkpoint is damaged"
            ) from None
        if min(pos.epoch, pos.shard_pos, pos.sample) < 0 or pos.shard_pos > len(self._urls):
            raise UserError(
                f"data state {state!r} points outside this rank's {len(self._urls)} shards: "
                "the checkpoint is damaged"
            )
        self._pos = pos
