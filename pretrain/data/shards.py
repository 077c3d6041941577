"""Endless, resumable samples from webdataset shards on any fsspec URL, for any sample kind.

The shards are split among a fixed number L of *logical readers* (lanes): each epoch, all shards
are put in an order drawn from (seed, epoch) and lane l takes every L-th, so no sample is read
twice or missed in an epoch. Within a shard, samples are shuffled in windows of `shuffle_buffer`,
each window by its own seeded permutation, so a reader's position (epoch, shard, slot) fixes
everything it yields next.

What makes a run resumable on another number of ranks or loader workers is that the order of
micro-batches does not depend on them: micro-batch g of the run (counted over all ranks) is the
next `batch_size` samples of lane g mod L, and rank r takes micro-batches r, r+W, ... of W ranks.
So rank r owns lanes r, r+W, ... and cycles through them; its loader workers split that cycle.
L is set when a run starts (`data.readers`, by default ranks x workers) and kept in its
checkpoints; any later layout whose ranks x workers divides L continues the same sequence.

A run may read a weighted mixture of shard sets (sources). Each lane then has one reader per
source, each source's shards split among the lanes by its own epoch order, and micro-batch g is
read from source s(g), drawn with the sources' weights from a counter-based hash of (seed, g)
(`draw_sources`). As s(g) depends on nothing else, a worker knows the source of each micro-batch
it makes, and how many micro-batches each source gave follows from the run's micro-batch count.
One source is the plain shard set: every draw picks it.

webdataset contributes the grouping of tar members into samples; it has neither an s3 scheme nor
resumable state, nor a check that a shard is whole, so opening streams (through fsspec, with
retries), positions and the tar members (each as long as its header says, as many samples as the
index lists) are kept here.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import posixpath
import random
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from itertools import islice
from typing import Any

import braceexpand
import fsspec
import numpy as np
from torch.utils.data import IterableDataset, default_collate, get_worker_info
from webdataset.tariterators import group_by_keys

from pretrain.errors import UserError

INDEX_NAME = "index.json"
STATE_VERSION = 4  # 4: one reader per (lane, source); 3: one shard set, loaded as a one-source mixture
ON_ERROR = ("raise", "skip")
CHUNK = 1 << 20  # micro-batch draws counted at a time (8 MiB of indices)
log = logging.getLogger("pretrain")

# decode(raw webdataset sample, shard url, seed for any randomness) -> training sample. The seed is
# drawn from (seed, epoch, shard, slot), so a sample is decoded the same way on every run.
Decoder = Callable[[dict, str, int], dict[str, Any]]


def expand_urls(urls: str | Iterable[str], key: str = "data.urls") -> list[str]:
    """Config key `key`'s URLs as a flat list: brace patterns expanded in a string or in each list item."""
    items = [urls] if isinstance(urls, str) else list(urls)
    expanded = [u.strip() for item in items for u in braceexpand.braceexpand(str(item))]
    expanded = [u for u in expanded if u]
    if not expanded:
        raise UserError(f"{key}={urls!r} gives no shard URL: set it to a brace pattern or a list of shard URLs")
    return expanded


def read_indexes(
    urls: list[str], storage_options: dict, formats: tuple[str, ...], hint: str, key: str = "data.urls"
) -> dict[str, dict]:
    """Index URL -> index, for each directory the shards lie in (their order of first appearance):
    a set may be spread over several directories or buckets, each with its own index.json."""
    by_directory: dict[str, list[str]] = {}
    for url in urls:
        by_directory.setdefault(posixpath.dirname(url), []).append(url)
    return {
        posixpath.join(directory, INDEX_NAME): read_index(members, storage_options, formats, hint, key)
        for directory, members in by_directory.items()
    }


def check_agreement(indexes: dict[str, dict], keys: tuple[str, ...]) -> None:
    """A run's shard sets must hold interchangeable samples: their indexes agree on `keys`."""
    (first, reference), *others = indexes.items()
    for path, index in others:
        for key in keys:
            if index.get(key) != reference.get(key):
                raise UserError(
                    f"{first} and {path} disagree on {key} ({reference.get(key)!r} vs {index.get(key)!r}): "
                    "the shard sets of one run must be prepared alike; re-create one of them to match the other"
                )


def read_index(
    urls: list[str], storage_options: dict, formats: tuple[str, ...], hint: str, key: str = "data.urls"
) -> dict:
    """The `index.json` beside the shards (all in one directory), after checking its format and
    that it lists every shard."""
    directory = posixpath.dirname(urls[0])
    path = posixpath.join(directory, INDEX_NAME)
    try:
        with fsspec.open(path, "r", **storage_options) as f:
            index = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path} not found: the shard set is missing or unfinished; {hint}") from None
    except ValueError as exc:
        raise UserError(f"cannot read {path} ({type(exc).__name__}: {exc}); {hint}") from None
    except Exception as exc:  # OSError, and what storage libraries raise beside it (botocore's connection errors)
        raise UserError(
            f"cannot read {path} ({type(exc).__name__}: {' '.join(str(exc).split())}): check the URL, "
            "data.storage_options (endpoint_url, credentials) and that the store is reachable"
        ) from None
    if not (
        isinstance(index, dict)
        and index.get("format") in formats
        and isinstance(index.get("shards"), list)
        and all(isinstance(s, dict) and {"name", "samples"} <= s.keys() for s in index["shards"])
    ):
        raise UserError(f"{path} is not a {' or '.join(formats)} index; {hint}")
    listed = {s["name"] for s in index["shards"]}
    for url in urls:
        if posixpath.basename(url) not in listed:
            raise UserError(f"shard {url} is not listed in {path}: fix {key} or {hint}")
    return index


@dataclass(frozen=True)
class ShardSource:
    """One shard set of a run's mixture: its shards (URL -> samples, in the order the config
    lists them), how to open them, its weight, and the config key that named it (for errors)."""

    name: str
    samples: dict[str, int]
    weight: float = 1.0
    storage_options: dict = field(default_factory=dict)
    key: str = "data.urls"

    @property
    def urls(self) -> list[str]:
        return list(self.samples)


GOLDEN_GAMMA, MIX_1, MIX_2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def mixture_probabilities(weights: Sequence[float]) -> list[float]:
    """The sources' shares of micro-batches, as the draws use them (so also what a checkpoint keeps)."""
    total = sum(weights)
    return [w / total for w in weights]


@functools.cache
def _mixture_key(seed: int) -> np.uint64:
    """The seed's SplitMix64 key, hashed once per seed: the draws run once per micro-batch."""
    return np.uint64(int.from_bytes(hashlib.blake2b(f"mixture:{seed}".encode(), digest_size=8).digest()))


def draw_sources(seed: int, probabilities: Sequence[float], batches: np.ndarray) -> np.ndarray:
    """The source of each micro-batch index in `batches`: SplitMix64 of (seed, g), a counter-based
    hash, as a uniform in [0, 1) placed among the cumulative shares. Independent draws, a pure
    function of (seed, g): the same on every rank, worker and resume, and countable for any g."""
    key = _mixture_key(seed)
    with np.errstate(over="ignore"):
        z = key + (batches.astype(np.uint64) + np.uint64(1)) * GOLDEN_GAMMA
        z = (z ^ (z >> np.uint64(30))) * MIX_1
        z = (z ^ (z >> np.uint64(27))) * MIX_2
        z ^= z >> np.uint64(31)
    uniform = (z >> np.uint64(11)).astype(np.float64) * 2.0**-53
    bounds = np.cumsum(probabilities)
    bounds[-1] = 1.0  # rounding must not leave a uniform above the last bound
    return np.searchsorted(bounds, uniform, side="right")


@dataclass(frozen=True)
class StreamOptions:
    """How a ShardStream reads: the data.* knobs that are not about what the samples are."""

    seed: int
    shuffle_buffer: int = 1
    retries: int = 3
    retry_backoff_s: float = 1.0
    on_error: str = "raise"


@dataclass
class ReaderState:
    """Where a logical reader is: the epoch, the place in its shard order, the slot in that
    shard, and how many bad samples it skipped (under on_error=skip)."""

    epoch: int = 0
    shard_pos: int = 0
    sample: int = 0
    skipped: int = 0


def _members(fileobj: Any, cut: list[str]) -> Iterator[dict[str, Any]]:
    """The regular files of a tar stream, as webdataset's {"fname", "data"} records, a whole
    sample's members at a time. A stream that ends inside a member (a truncated shard) ends here
    without the sample it cuts, the reason in `cut`: the samples before it stay whole, and the
    caller reports it."""
    sample: list[dict[str, Any]] = []  # the members of the current key, held until it is complete
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        name = None
        try:
            for info in tar:
                name = info.name
                if not info.isreg():
                    continue
                if sample and _key(sample[0]["fname"]) != _key(name):
                    yield from sample
                    sample = []
                data = tar.extractfile(info).read()
                if len(data) != info.size:
                    break
                sample.append({"fname": name, "data": data})
                tar.members = []  # a stream: keep no record of the members already read
            else:
                yield from sample
                return
        except tarfile.ReadError:
            if name is None:  # not a tar at all: reported as what tarfile says
                raise
        cut.append(f"truncated: it ends inside member {name}")


def _key(fname: str) -> str:
    """webdataset's sample key of a member: its path up to the first dot of its file name."""
    directory, _, base = fname.rpartition("/")
    return f"{directory}/{base.split('.', 1)[0]}"


@dataclass(frozen=True)
class WorkerFailure:
    """A loader worker's UserError, carried to the training process as data."""

    message: str


class _ShardError(Exception):
    """A shard that cannot be read: missing, truncated, not a tar."""


class _Unreachable(Exception):
    """The store did not answer, retries included: not the shard's fault, so never skipped."""


def reader_cycle(readers: int, rank: int, world_size: int, worker: int, workers: int, batches: int) -> list[int]:
    """The lanes one loader worker reads, in the order it reads them, once `batches`
    micro-batches of the run have been consumed. The rank's cycle r, r+W, ... starts where the
    run's micro-batch count puts it, and the DataLoader takes batches from its workers in turn,
    so worker w takes every N-th lane of the cycle from the w-th on."""
    per_rank = readers // world_size
    start = batches // world_size % per_rank
    return [rank + (start + worker + m * workers) % per_rank * world_size for m in range(per_rank // workers)]


class ShardStream(IterableDataset):
    """One rank's micro-batches (`collate`d lists of `batch_size` decoded samples), each with the
    lane and source it came from and that reader's position after it.

    The stream in the training process is the record of what training consumed (`consumed`,
    `state_dict`, `load_state_dict`); each DataLoader worker gets a copy of it when iteration
    starts and reads its share of the rank's lanes from there.
    """

    def __init__(
        self,
        sources: list[ShardSource],
        decode: Decoder,
        *,
        rank: int,
        world_size: int,
        num_workers: int,
        batch_size: int,
        readers: int,
        options: StreamOptions,
        collate: Callable[[list[dict]], Any] | None = None,
        epochs: int | None = None,
    ) -> None:
        """readers: L for a run that starts now (0: ranks x workers); a loaded state brings its own.
        epochs: None reads on forever (training); N stops each lane after N epochs, its last
        micro-batch possibly short (evaluation, which reads one source)."""
        if options.on_error not in ON_ERROR:
            raise UserError(f"data.on_error={options.on_error!r} is not one of {', '.join(ON_ERROR)}")
        self.sources, self.decode = sources, decode
        self.probabilities = mixture_probabilities([source.weight for source in sources])
        # Draws name a shard by its source and place in the list, not its URL: the same shards
        # stored elsewhere (a copy on S3, another cache directory) are shuffled and augmented alike.
        # The first source's names are those of a plain shard set.
        self._shard_tags = [
            {url: f"{i}.{n}" if i else str(n) for n, url in enumerate(source.urls)} for i, source in enumerate(sources)
        ]
        self.rank, self.world_size, self.workers = rank, world_size, max(1, num_workers)
        self.batch_size, self.options = batch_size, options
        self.collate = collate or default_collate
        self.epochs = epochs
        self.readers = readers or world_size * self.workers
        self._check_split(f"data.readers={readers}" if readers else None)
        self.batches = 0  # micro-batches of the run consumed, over all ranks
        self.positions = {key: ReaderState() for key in self._own_readers()}
        self._counted = (0, [0] * len(sources))  # (micro-batches, of them from each source): see source_batches

    def _own_readers(self) -> list[tuple[int, int]]:
        """(lane, source) of every reader this rank owns."""
        return [(lane, i) for lane in range(self.rank, self.readers, self.world_size) for i in range(len(self.sources))]

    def _check_split(self, origin: str | None) -> None:
        """L lanes must split evenly over ranks x workers, and each needs a shard of every source.
        `origin` names where L came from when it was set explicitly (None: a checkpoint)."""
        layout = f"{self.world_size} ranks x {self.workers} loader workers"
        for source in self.sources:
            if self.readers > len(source.urls):
                raise UserError(
                    f"{source.key} gives {len(source.urls)} shards for {origin or layout} ({self.readers} "
                    f"readers): every reader needs one; write more, smaller shards or lower data.num_workers"
                )
        if self.readers % (self.world_size * self.workers):
            fits = [n for n in range(self.workers, 0, -1) if self.readers % (self.world_size * n) == 0]
            hint = f"set data.num_workers={fits[0]}" if fits else f"use a number of ranks that divides {self.readers}"
            what = origin or (
                f"the run's {self.readers} logical readers (data.readers, fixed when it started; "
                f"kept in its checkpoints)"
            )
            raise UserError(f"{what} cannot be shared evenly by {layout}: {hint}")

    def epoch_order(self, epoch: int, lane: int, source: int = 0) -> list[str]:
        """Lane `lane`'s shards of source `source` in the order epoch `epoch` reads them."""
        order = self.sources[source].urls
        random.Random(f"{self.options.seed}:{epoch}:{source}" if source else self.options.seed + epoch).shuffle(order)
        return order[lane :: self.readers]

    def source_of(self, batches: np.ndarray) -> np.ndarray:
        """The source index of each of the run's micro-batches `batches`."""
        return draw_sources(self.options.seed, self.probabilities, batches)

    def __iter__(self) -> Iterator[tuple[Any, tuple[int, int, dict[str, int]]]]:
        """(micro-batch, (lane, source, that reader's position after it)). Turn t of worker w is
        the rank's micro-batch w + t x workers from the record on, which fixes g and so the source.
        In a loader worker, a UserError is sent as a `WorkerFailure` item and ends the worker:
        raised there, it would reach the user as torch's multi-line "Caught UserError in
        DataLoader worker process N" report."""
        info = get_worker_info()
        worker, start = info.id if info else 0, self.batches  # read in this process, self.batches moves on
        cycle = reader_cycle(self.readers, self.rank, self.world_size, worker, self.workers, start)
        states = {
            (lane, i): ReaderState(**asdict(self.positions[lane, i]))
            for lane in cycle
            for i in range(len(self.sources))
        }
        samples = {key: self._samples(*key, state) for key, state in states.items()}
        turn = 0
        try:
            while cycle:
                for lane in list(cycle):
                    g = start + self.rank + (worker + turn * self.workers) * self.world_size
                    source, turn = int(self.source_of(np.array([g]))[0]), turn + 1
                    batch = list(islice(samples[lane, source], self.batch_size))
                    if batch:
                        yield self.collate(batch), (lane, source, asdict(states[lane, source]))
                    else:  # only a reader of a finite stream runs out
                        cycle.remove(lane)
        except UserError as exc:
            if info is None:
                raise
            yield WorkerFailure(str(exc)), (-1, -1, {})

    def consumed(self, lane: int, source: int, position: dict[str, int]) -> None:
        """Training took a micro-batch that left lane `lane`'s reader of `source` at `position`."""
        self.positions[lane, source] = ReaderState(**position)
        self.batches += self.world_size  # every rank takes one in the same turn

    def source_batches(self) -> list[int]:
        """How many of the run's micro-batches so far (over all ranks) each source gave: counted
        from the draws, incrementally (a resumed run counts its past once, in chunks)."""
        counted, counts = self._counted
        for start in range(counted, self.batches, CHUNK):
            drawn = self.source_of(np.arange(start, min(start + CHUNK, self.batches)))
            counts = [c + n for c, n in zip(counts, np.bincount(drawn, minlength=len(counts)).tolist(), strict=True)]
        self._counted = (max(counted, self.batches), counts)
        return counts

    def _samples(self, lane: int, source: int, state: ReaderState) -> Iterator[dict[str, Any]]:
        while self.epochs is None or state.epoch < self.epochs:
            shards = self.epoch_order(state.epoch, lane, source)
            while state.shard_pos < len(shards):
                url = shards[state.shard_pos]
                try:
                    yield from self._shard(source, url, state)
                except _ShardError as exc:
                    lost = self.sources[source].samples[url] - state.sample
                    self._fail(url, None, str(exc), state, lost=lost)
                except _Unreachable as exc:
                    raise UserError(
                        f"cannot read shard {url}: the store did not answer ({' '.join(str(exc).split())}); check "
                        f"that it is reachable, or raise data.retries (now {self.options.retries}) or "
                        f"data.retry_backoff_s to wait longer; a restart resumes from the last checkpoint"
                    ) from None
                state.shard_pos, state.sample = state.shard_pos + 1, 0
            state.epoch, state.shard_pos = state.epoch + 1, 0

    def _shard(self, source: int, url: str, state: ReaderState) -> Iterator[dict[str, Any]]:
        """The shard's samples from slot `state.sample` on, advancing it as each slot is taken."""
        window_size = max(1, self.options.shuffle_buffer)
        window_index = state.sample // window_size
        raw = self._raw_samples(self.sources[source], url, window_index * window_size)
        while window := list(islice(raw, window_size)):
            order = list(range(len(window)))
            salt = f"{self.options.seed}:{state.epoch}:{self._shard_tags[source][url]}:{window_index}"
            random.Random(salt).shuffle(order)
            for slot in range(state.sample - window_index * window_size, len(window)):
                state.sample += 1
                raw_index = window_index * window_size + order[slot]
                sample = self._decode(window[order[slot]], url, f"{salt}:{raw_index}", state)
                if sample is not None:
                    yield sample
            window_index += 1

    def _raw_samples(self, source: ShardSource, url: str, start: int) -> Iterator[dict]:
        """Undecoded samples from index `start` on. A transient read error reopens the shard and
        goes on from the first sample not yet delivered, `retries` times with doubling backoff."""
        delivered, attempt = start, 0
        while True:
            try:
                with fsspec.open(url, "rb", **source.storage_options) as stream:
                    cut: list[str] = []
                    files = ({**f, "__url__": url} for f in _members(stream, cut))
                    total = 0
                    for total, sample in enumerate(group_by_keys(files), start=1):
                        self._check_count(source, url, total, ended=False)
                        if total > delivered:
                            delivered += 1
                            yield sample
                if cut:
                    raise _ShardError(cut[0])
                self._check_count(source, url, total, ended=True)
                return
            except _ShardError:
                raise
            except (FileNotFoundError, PermissionError) as exc:
                raise _ShardError(f"{type(exc).__name__}: {exc}") from None
            except (tarfile.TarError, EOFError, ValueError, KeyError) as exc:
                raise _ShardError(f"{type(exc).__name__}: {exc}") from None
            except Exception as exc:  # OSError, and what storage libraries raise beside it (botocore's)
                attempt += 1
                if attempt > self.options.retries:
                    raise _Unreachable(f"{type(exc).__name__} after {self.options.retries} retries: {exc}") from None
                log.warning("reading shard %s failed (%s); retry %d/%d", url, exc, attempt, self.options.retries)
                time.sleep(self.options.retry_backoff_s * 2 ** (attempt - 1))

    def _check_count(self, source: ShardSource, url: str, total: int, ended: bool) -> None:
        """A tar stream that ends early looks like a short, valid one: only the index can tell."""
        expected = source.samples[url]
        if total > expected:
            raise _ShardError(
                f"it holds {total} samples, its index.json lists {expected}: shard and index are from different runs"
            )
        if ended and total < expected:
            raise _ShardError(f"truncated: it ends after {total} of the {expected} samples its index.json lists")

    def _decode(self, sample: dict, url: str, salt: str, state: ReaderState) -> dict[str, Any] | None:
        sample_seed = int.from_bytes(hashlib.blake2b(salt.encode(), digest_size=8).digest()) >> 1  # 63 bits
        try:
            return self.decode(sample, url, sample_seed)
        except UserError as exc:
            self._fail(url, sample.get("__key__"), str(exc), state, lost=1)
            return None

    def _fail(self, url: str, key: str | None, cause: str, state: ReaderState, lost: int) -> None:
        """on_error=raise: one line naming the shard (and member); skip: count and go on."""
        where = f"shard {url}" + (f" member {key}" if key else "")
        if self.options.on_error == "raise":
            raise UserError(
                f"cannot read {where} ({' '.join(cause.split())}): re-create it, or set "
                "data.on_error=skip to count and skip bad samples"
            )
        state.skipped += lost
        log.warning("skipped %d sample(s) of %s: %s", lost, where, " ".join(cause.split()))

    def skipped(self) -> int:
        """Bad samples this rank's readers skipped, as of the last micro-batch consumed."""
        return sum(p.skipped for p in self.positions.values())

    def state_dict(self) -> dict[str, Any]:
        """JSON: this rank's readers' positions (per lane, one per source) as of the last
        micro-batch consumed, and what the run's sequence of micro-batches is cut from.
        merge_states joins those of all ranks."""
        lanes: dict[str, list[dict[str, int]]] = {}
        for (lane, _), position in sorted(self.positions.items()):
            lanes.setdefault(str(lane), []).append(asdict(position))
        return {"version": STATE_VERSION, **self._sequence(), "batches": self.batches, "positions": lanes}

    def _sequence(self) -> dict[str, Any]:
        """What fixes the run's sequence of micro-batches, besides the shards' contents."""
        return {
            "readers": self.readers,
            "batch_size": self.batch_size,
            "sources": [
                {"num_shards": len(source.urls), "share": share}
                for source, share in zip(self.sources, self.probabilities, strict=True)
            ],
            "seed": self.options.seed,
            "shuffle_buffer": self.options.shuffle_buffer,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the run's sequence of micro-batches where `state` (this rank's, or every
        rank's joined by merge_states) left it, on this layout of ranks and workers."""
        if state.get("version") == 3:  # one shard set: a mixture of one source, one reader per lane
            state = {
                **{k: v for k, v in state.items() if k != "num_shards"},
                "version": STATE_VERSION,
                "sources": [{"num_shards": state.get("num_shards"), "share": 1.0}],
                "positions": {lane: [position] for lane, position in state["positions"].items()},
            }
        expected = {"version": STATE_VERSION, **self._sequence()}
        del expected["readers"]  # the checkpoint's count of readers is kept, whatever this run's default
        changed = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if changed:
            detail = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
            raise UserError(
                f"the data changed since the checkpoint ({detail}): resume with the same shards, "
                "train.micro_batch_size, seed, data.shuffle_buffer and source weights, or start a new run"
            )
        self.readers = state["readers"]
        self._check_split(None)
        if state["batches"] % self.world_size:
            raise UserError(
                f"the checkpoint's data state is cut after {state['batches']} micro-batches, which "
                f"{self.world_size} ranks cannot have taken in equal turns; resume from another checkpoint"
            )
        positions = state["positions"]
        lanes = range(self.rank, self.readers, self.world_size)
        missing = [lane for lane in lanes if str(lane) not in positions]
        if missing:
            raise UserError(
                f"the checkpoint's data state has no position for logical readers {missing}: "
                "a rank's data_rank*.json is missing from it; resume from another checkpoint"
            )
        self.batches, self._counted = state["batches"], (0, [0] * len(self.sources))
        self.positions = {(lane, i): ReaderState(**positions[str(lane)][i]) for lane, i in self._own_readers()}


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Every rank's data state joined into one, from which any layout of ranks and workers that
    splits the run's readers evenly can continue (ShardStream.load_state_dict)."""
    first = states[0]
    sequence = {k: v for k, v in first.items() if k != "positions"}
    for state in states[1:]:
        if {k: v for k, v in state.items() if k != "positions"} != sequence:
            raise UserError(
                "the checkpoint's data_rank*.json files disagree on where the run's data stand; "
                "resume from another checkpoint"
            )
    return {**sequence, "positions": {reader: p for state in states for reader, p in state["positions"].items()}}
