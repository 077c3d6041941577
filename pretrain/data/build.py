"""A rank's loader from `data.*`: `data.source` picks where the shards come from, the loader
kind what a sample is (token blocks for language models, labelled images for vision models)."""

from __future__ import annotations

import dataclasses
import json
import posixpath
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import MISSING

from pretrain.batch import Batch
from pretrain.config import DataConfig, ImageConfig
from pretrain.data import images, tokens
from pretrain.data.augment import RandAugment, RandomErasing
from pretrain.data.images import EvalTransform, ImageDecoder, TrainTransform, check_image_index
from pretrain.data.loader import ShardLoader
from pretrain.data.shards import Decoder, ShardStream, StreamOptions, expand_urls, read_index
from pretrain.data.storage import INDEX_NAME
from pretrain.data.tokens import TokenBlockDecoder, check_token_index, split_tokens, stack_blocks
from pretrain.errors import UserError
from pretrain.prepare.embedded import prepare_digits, prepare_stdlib_corpus

TEXT_SOURCES = ("stdlib", "shards")
IMAGE_SOURCES = ("digits", "shards")


@dataclass(frozen=True)
class ShardSet:
    """One rank's view of a shard set and how its samples become batches: what every loader
    of it needs besides `data.*`."""

    urls: list[str]
    storage_options: dict
    index: dict
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

    urls, storage_options = _shard_urls(cfg, TEXT_SOURCES, embedded, local_rank, train)
    index = read_index(urls, storage_options, (tokens.INDEX_FORMAT,), tokens.PREPARE_HINT)
    decode = TokenBlockDecoder(seq_len, check_token_index(index, seq_len, vocab_size))
    shards = ShardSet(
        urls,
        storage_options,
        index,
        decode,
        batch_size,
        rank,
        world_size,
        seed,
        collate=stack_blocks,
        finish=split_tokens,
        worker_init=worker_init,
    )
    return _train_loader(cfg, shards) if train else _one_pass(cfg, shards)


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

    def embedded(is_preparer: bool) -> str:
        return prepare_digits(
            cfg.cache_dir,
            cfg.samples_per_shard,
            is_preparer,
            split="train" if train else "val",
            progress=is_preparer and sys.stderr.isatty(),
        )

    urls, storage_options = _shard_urls(cfg, IMAGE_SOURCES, embedded, local_rank, train)
    index = read_index(urls, storage_options, (images.INDEX_FORMAT,), images.PREPARE_HINT)
    decode = ImageDecoder(_image_transform(cfg.image, image_size, train), check_image_index(index))
    shards = ShardSet(urls, storage_options, index, decode, batch_size, rank, world_size, seed, worker_init=worker_init)
    return _train_loader(cfg, shards) if train else _one_pass(cfg, shards)


def _train_loader(cfg: DataConfig, shards: ShardSet) -> ShardLoader:
    """Endless and shuffled, `data.num_workers` loader workers over `data.readers` logical readers."""
    return _loader(cfg, shards, cfg.shuffle_buffer, cfg.num_workers, cfg.readers)


def _one_pass(cfg: DataConfig, shards: ShardSet) -> Iterable[Batch]:
    """One pass over validation shards in shard order, each sample once over the ranks. With
    fewer shards than ranks the first ranks read one each and the others nothing (evaluation
    steps every rank in lockstep anyway); loader workers are capped so that each has a shard."""
    ranks = min(shards.world_size, len(shards.urls))
    if shards.rank >= ranks:
        return ()
    workers = min(cfg.num_workers, len(shards.urls) // ranks)
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


def _shard_urls(
    cfg: DataConfig, sources: tuple[str, ...], embedded: Callable[[bool], str], local_rank: int, train: bool = True
) -> tuple[list[str], dict]:
    """The shard URLs (`data.urls`, or `data.val_urls` when not `train`) and their storage
    options. An embedded default (the first source) is built by local rank 0 of each machine
    into `data.cache_dir` while the other ranks wait."""
    if cfg.source == sources[0]:
        directory = embedded(local_rank == 0)
        index = json.loads(Path(directory, INDEX_NAME).read_text())
        return [str(Path(directory, s["name"])) for s in index["shards"]], {}
    if cfg.source == "shards":
        key, urls = ("data.urls", cfg.urls) if train else ("data.val_urls", cfg.val_urls)
        if urls in (None, MISSING):
            raise UserError(
                f"{key} is required when data.source=shards: set it to the shard URLs, "
                f"""e.g. '{key}="s3://bucket/dir/shard-{{000000..000099}}.tar"'"""
            )
        return expand_urls(urls), cfg.storage_options
    raise UserError(f"data.source={cfg.source!r} is not one of {', '.join(sources)}")


def _loader(
    cfg: DataConfig, shards: ShardSet, shuffle_buffer: int, workers: int, readers: int, epochs: int | None = None
) -> ShardLoader:
    """`readers` 0: the logical readers are ranks x workers."""
    samples = {s["name"]: s["samples"] for s in shards.index["shards"]}
    stream = ShardStream(
        shards.urls,
        {url: samples[posixpath.basename(url)] for url in shards.urls},
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
        storage_options=shards.storage_options,
        collate=shards.collate,
        epochs=epochs,
    )
    return ShardLoader(stream, workers, shards.finish, shards.worker_init)
