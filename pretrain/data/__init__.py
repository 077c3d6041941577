"""Data for training: `data.source` picks where the token blocks come from."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import MISSING

from pretrain.config import DataConfig
from pretrain.data.shards import TokenBlockStream
from pretrain.data.text import INDEX_NAME, prepare_stdlib_corpus
from pretrain.errors import UserError

TEXT_SOURCES = ("stdlib", "shards")


def build_text_stream(
    cfg: DataConfig,
    *,
    seq_len: int,
    vocab_size: int,
    batch_size: int,
    rank: int,
    world_size: int,
    local_rank: int,
    seed: int,
) -> TokenBlockStream:
    """The training stream for this rank: the embedded stdlib corpus, or the shards at `data.urls`.

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
    return TokenBlockStream(
        urls,
        seq_len=seq_len,
        vocab_size=vocab_size,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        storage_options=storage_options,
    )


def _local_shard_urls(directory: str) -> list[str]:
    """Every shard the prepared corpus's index lists, as paths."""
    index = json.loads(Path(directory, INDEX_NAME).read_text())
    return [str(Path(directory, s["name"])) for s in index["shards"]]
