"""Data for training: `data.source` picks where the token blocks come from."""

from __future__ import annotations

import json
import posixpath
import sys
from pathlib import Path

from omegaconf import MISSING

from pretrain.config import DataConfig
from pretrain.data.loader import ShardLoader
from pretrain.data.shards import INDEX_NAME, ShardStream, StreamOptions, expand_urls, read_index
from pretrain.data.text import INDEX_FORMAT, prepare_stdlib_corpus
from pretrain.data.tokens import PREPARE_HINT, TokenBlockDecoder, check_token_index
from pretrain.errors import UserError

TEXT_SOURCES = ("stdlib", "shards")


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
) -> ShardLoader:
    """This rank's batches: the embedded stdlib corpus, or the token shards at `data.urls`.

    For "stdlib", local rank 0 of each machine builds the corpus into `data.cache_dir` (showing
    progress when stderr is a terminal) while the other local ranks wait for it.
    """
    if cfg.source == "stdlib":
        is_preparer = local_rank == 0
        directory = prepare_stdlib_corpus(
            cfg.cache_dir,
            seq_len + 1,
            cfg.blocks_per_shard,
            int(cfg.stdlib_max_mb * 2**20),
            is_preparer=is_preparer,
            progress=is_preparer and sys.stderr.isatty(),
        )
        urls: str | list[str] = _local_shard_urls(directory)
        storage_options: dict = {}
    elif cfg.source == "shards":
        if cfg.urls in (None, MISSING):
            raise UserError(
                "data.urls is required when data.source=shards: set it to the shard URLs, "
                """e.g. 'data.urls="s3://bucket/dir/shard-{000000..000099}.tar"'"""
            )
        urls, storage_options = cfg.urls, cfg.storage_options
    else:
        raise UserError(f"data.source={cfg.source!r} is not one of {', '.join(TEXT_SOURCES)}")
    shard_urls = expand_urls(urls)
    index = read_index(shard_urls, storage_options, (INDEX_FORMAT,), PREPARE_HINT)
    decode = TokenBlockDecoder(seq_len, check_token_index(index, seq_len, vocab_size))
    samples = {s["name"]: s["samples"] for s in index["shards"]}
    stream = ShardStream(
        shard_urls,
        {url: samples[posixpath.basename(url)] for url in shard_urls},
        decode,
        rank=rank,
        world_size=world_size,
        num_workers=cfg.num_workers,
        options=StreamOptions(seed=seed, shuffle_buffer=cfg.shuffle_buffer, retries=cfg.retries,
                              retry_backoff_s=cfg.retry_backoff_s, on_error=cfg.on_error),
        storage_options=storage_options,
    )
    return ShardLoader(stream, batch_size, cfg.num_workers)


def _local_shard_urls(directory: str) -> list[str]:
    """Every shard the prepared corpus's index lists, as paths."""
    index = json.loads(Path(directory, INDEX_NAME).read_text())
    return [str(Path(directory, s["name"])) for s in index["shards"]]
