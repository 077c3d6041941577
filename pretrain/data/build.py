"""A rank's loader from `data.*`: `data.source` picks where the shards come from (and
`data.urls` or the weighted mixture `data.sources` which they are), the loader kind what a sample
is (token blocks for language models, labelled images for vision models)."""

from __future__ import annotations

import dataclasses
import functools
import json
import posixpath
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from omegaconf import MISSING

from pretrain.batch import Batch
from pretrain.config import DataConfig, ImageConfig, directory_name, source_names
from pretrain.data import images, tokens
from pretrain.data.augment import RandAugment, RandomErasing
from pretrain.data.images import EvalTransform, ImageDecoder, TrainTransform, check_image_index
from pretrain.data.loader import ShardLoader
from pretrain.data.shards import (
    Decoder,
    ShardSource,
    ShardStream,
    StreamOptions,
    check_agreement,
    expand_urls,
    read_indexes,
)
from pretrain.data.storage import INDEX_NAME
from pretrain.data.tokenizer import TOKENIZER_DIR
from pretrain.data.tokens import TokenBlockDecoder, check_token_indexes, split_tokens, stack_blocks
from pretrain.errors import UserError
from pretrain.prepare.embedded import prepare_digits, prepare_stdlib_corpus

TEXT_SOURCES = ("stdlib", "shards")
IMAGE_SOURCES = ("digits", "shards")
# What index.json fields make samples of two shard sets interchangeable in one run.
TEXT_AGREE = ("format", "block_len", "dtype")  # and the tokenizer: check_token_indexes
IMAGE_AGREE = ("format", "classes", "num_classes")


@dataclass(frozen=True)
class ShardSet:
    """One rank's view of a run's shard sources and how their samples become batches: what every
    loader of them needs besides `data.*`."""

    sources: list[ShardSource]
    decode: Decoder
    batch_size: int
    rank: int
    world_size: int
    seed: int
    collate: Callable[[list[dict]], dict] | None = None  # samples -> batch, in the loader worker
    finish: Callable[[dict], dict] | None = None  # batch -> training batch, in the training process
    worker_init: Callable[[int], None] | None = None  # runs first in each loader worker


def build_text_loader(
    cfg: DataConfig,
    *,
    seq_len: int,
    vocab_size: int,
    batch_size: int,
    rank: int,
    world_size: int,
    local_rank: int,
    seed: int,
    train: bool = True,
    worker_init: Callable[[int], None] | None = None,
) -> Iterable[Batch]:
    """This rank's token-block batches. train: endless and shuffled, from the embedded stdlib
    corpus's train split or the shards at `data.urls`; otherwise one pass over its val split
    (every 20th document) or `data.val_urls` (see `_one_pass`). `worker_init` runs first in
    each loader worker."""

    def embedded(is_preparer: bool) -> str:
        return prepare_stdlib_corpus(
            cfg.cache_dir,
            seq_len + 1,
            cfg.samples_per_shard,
            int(cfg.stdlib_max_mb * 2**20),
            is_preparer=is_preparer,
            split="train" if train else "val",
            progress=is_preparer and sys.stderr.isatty(),
        )

    sources, indexes = _shard_sources(cfg, TEXT_SOURCES, embedded, local_rank, train, tokens, TEXT_AGREE)
    index = next(iter(indexes.values()))  # all agree on what the decoder needs
    decode = TokenBlockDecoder(seq_len, check_token_indexes(indexes, seq_len, vocab_size))
    shards = ShardSet(
        sources,
        decode,
        batch_size,
        rank,
        world_size,
        seed,
        collate=stack_blocks,
        finish=functools.partial(split_tokens, eos_id=index["tokenizer"]["eos"] if cfg.document_mask else None),
        worker_init=worker_init,
    )
    if not train:
        return _one_pass(cfg, shards)
    loader = _train_loader(cfg, shards)
    # The run's tokenizer, which checkpoints record: the agreed identity, and where the first source's copy is.
    tokenizer_dir = posixpath.join(posixpath.dirname(next(iter(indexes))), TOKENIZER_DIR)
    loader.tokenizer = {**index["tokenizer"], "url": tokenizer_dir}
    return loader


def build_image_loader(
    cfg: DataConfig,
    *,
    image_size: int,
    batch_size: int,
    rank: int,
    world_size: int,
    local_rank: int,
    seed: int,
    train: bool,
    worker_init: Callable[[int], None] | None = None,
) -> Iterable[Batch]:
    """This rank's image batches ({'images': (B, 3, S, S), 'labels': (B,)}).

    train: endless, shuffled and augmented (random-resized crop and flip) batches of the digits'
    train split or the shards at `data.urls`. Otherwise one pass, resized and centre-cropped,
    over the digits' val split or `data.val_urls` (see `_one_pass`).
    """
    if cfg.document_mask:
        raise UserError("data.document_mask=true is for language models, whose documents end at EOS: set it false")

    def embedded(is_preparer: bool) -> str:
        return prepare_digits(
            cfg.cache_dir,
            cfg.samples_per_shard,
            is_preparer,
            split="train" if train else "val",
            progress=is_preparer and sys.stderr.isatty(),
        )

    sources, indexes = _shard_sources(cfg, IMAGE_SOURCES, embedded, local_rank, train, images, IMAGE_AGREE)
    index = next(iter(indexes.values()))  # all agree on the classes
    decode = ImageDecoder(_image_transform(cfg.image, image_size, train), check_image_index(index))
    shards = ShardSet(sources, decode, batch_size, rank, world_size, seed, worker_init=worker_init)
    return _train_loader(cfg, shards) if train else _one_pass(cfg, shards)


def _train_loader(cfg: DataConfig, shards: ShardSet) -> ShardLoader:
    """Endless and shuffled, `data.num_workers` loader workers over `data.readers` logical readers."""
    return _loader(cfg, shards, cfg.shuffle_buffer, cfg.num_workers, cfg.readers)


def _one_pass(cfg: DataConfig, shards: ShardSet) -> Iterable[Batch]:
    """One pass over validation shards in shard order, each sample once over the ranks. With
    fewer shards than ranks the first ranks read one each and the others nothing (evaluation
    steps every rank in lockstep anyway); loader workers are capped so that each has a shard."""
    (source,) = shards.sources  # data.val_urls, or an embedded val split
    ranks = min(shards.world_size, len(source.urls))
    if shards.rank >= ranks:
        return ()
    workers = min(cfg.num_workers, len(source.urls) // ranks)
    return _loader(cfg, dataclasses.replace(shards, world_size=ranks), 1, workers, 0, epochs=1)


def _image_transform(cfg: ImageConfig, image_size: int, train: bool) -> TrainTransform | EvalTransform:
    mean, std = tuple(cfg.mean), tuple(cfg.std)
    if train:
        rand_augment = (
            RandAugment(
                cfg.rand_augment_ops, cfg.rand_augment_magnitude, cfg.rand_augment_magnitude_std, cfg.rand_augment_prob
            )
            if cfg.rand_augment_ops
            else None
        )
        return TrainTransform(
            image_size,
            scale=tuple(cfg.crop_scale),
            ratio=tuple(cfg.crop_ratio),
            flip_p=cfg.flip_p,
            mean=mean,
            std=std,
            rand_augment=rand_augment,
            erasing=RandomErasing(cfg.erase_prob) if cfg.erase_prob else None,
        )
    if not 0 < cfg.eval_crop_fraction <= 1:
        raise UserError(f"data.image.eval_crop_fraction={cfg.eval_crop_fraction} must be in (0, 1]")
    return EvalTransform(image_size, round(image_size / cfg.eval_crop_fraction), mean=mean, std=std)


def _shard_sources(
    cfg: DataConfig,
    kinds: tuple[str, ...],
    embedded: Callable[[bool], str],
    local_rank: int,
    train: bool,
    fmt: ModuleType,
    agree: tuple[str, ...],
) -> tuple[list[ShardSource], dict[str, dict]]:
    """The run's shard sources (`data.sources`, `data.urls`, or `data.val_urls` when not
    `train`) and every index.json they read (index URL -> index, the first source's first), all
    checked to agree on `agree`. An embedded default (the first kind) is built by local rank 0 of
    each machine into `data.cache_dir` while the other ranks wait."""
    if cfg.source == kinds[0]:
        directory = embedded(local_rank == 0)
        index = json.loads(Path(directory, INDEX_NAME).read_text())
        urls = [str(Path(directory, s["name"])) for s in index["shards"]]
        specs = [(cfg.source, f"data.source={cfg.source}", urls, 1.0, {})]
    elif cfg.source == "shards":
        specs = _configured_sources(cfg, train)
    else:
        raise UserError(f"data.source={cfg.source!r} is not one of {', '.join(kinds)}")
    sources, indexes = [], {}
    for name, key, urls, weight, storage_options in specs:
        found = read_indexes(urls, storage_options, (fmt.INDEX_FORMAT,), fmt.PREPARE_HINT, key)
        counts = {path: {s["name"]: s["samples"] for s in index["shards"]} for path, index in found.items()}
        samples = {
            url: counts[posixpath.join(posixpath.dirname(url), INDEX_NAME)][posixpath.basename(url)] for url in urls
        }
        sources.append(ShardSource(name, samples, weight, storage_options, key))
        indexes.update(found)
    check_agreement(indexes, agree)
    return sources, indexes


def _configured_sources(cfg: DataConfig, train: bool) -> list[tuple[str, str, list[str], float, dict]]:
    """(name, config key, URLs, weight, storage options) of each configured shard source."""
    if not train:
        if cfg.val_urls in (None, MISSING):
            raise UserError(
                "data.val_urls is required when data.source=shards: set it to the shard URLs, "
                """e.g. 'data.val_urls="s3://bucket/dir/shard-{000000..000099}.tar"'"""
            )
        urls = expand_urls(cfg.val_urls, "data.val_urls")
        return [(directory_name(urls[0]), "data.val_urls", urls, 1.0, cfg.storage_options)]
    names = source_names(cfg)
    if not names:
        if cfg.urls in (None, MISSING):
            raise UserError(
                "data.urls is required when data.source=shards: set it to the shard URLs, e.g. "
                """'data.urls="s3://bucket/dir/shard-{000000..000099}.tar"', or give a weighted mixture as """
                "data.sources"
            )
        urls = expand_urls(cfg.urls)
        return [(directory_name(urls[0]), "data.urls", urls, 1.0, cfg.storage_options)]
    return [
        (
            name,
            f"data.sources[{i}].urls",
            expand_urls(source.urls, f"data.sources[{i}].urls"),
            source.weight,
            cfg.storage_options if source.storage_options is None else source.storage_options,
        )
        for i, (name, source) in enumerate(zip(names, cfg.sources, strict=True))
    ]


def _loader(
    cfg: DataConfig, shards: ShardSet, shuffle_buffer: int, workers: int, readers: int, epochs: int | None = None
) -> ShardLoader:
    """`readers` 0: the logical readers are ranks x workers."""
    stream = ShardStream(
        shards.sources,
        shards.decode,
        rank=shards.rank,
        world_size=shards.world_size,
        num_workers=workers,
        batch_size=shards.batch_size,
        readers=readers,
        options=StreamOptions(
            seed=shards.seed,
            shuffle_buffer=shuffle_buffer,
            retries=cfg.retries,
            retry_backoff_s=cfg.retry_backoff_s,
            on_error=cfg.on_error,
        ),
        collate=shards.collate,
        epochs=epochs,
    )
    return ShardLoader(stream, workers, shards.finish, shards.worker_init)
