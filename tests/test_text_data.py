"""Text shards: writing them, reading them back, the CLI, and the embedded stdlib corpus."""

import contextlib
import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from webdataset.tariterators import group_by_keys, tar_file_iterator

import pretrain.prepare.embedded as embedded
from pretrain.config import DataConfig
from pretrain.data.build import build_image_loader, build_text_loader
from pretrain.data.tokenizer import TokenizerSpec, gpt2_files_dir, gpt2_tokenizer
from pretrain.data.tokens import check_token_index
from pretrain.errors import UserError
from pretrain.prepare.embedded import prepare_stdlib_corpus, stdlib_documents
from pretrain.prepare.text import write_token_shards

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN = 16
BLOCK_LEN = SEQ_LEN + 1
BLOCKS_PER_SHARD = 4
VOCAB = 50304  # the models' padded GPT-2 vocabulary
DOCS = [
    "The quick brown fox jumps over the lazy dog. " * 6,
    "Ünïcödé text: naïve café, 日本語, and an emoji 🚀 in the middle of a sentence.",
    "short",
    "A longer document about tokenizers and shards, written to fill several blocks. " * 8,
    "Last words of the corpus; some of them end up in the dropped partial block.",
]


def token_stream(docs):
    enc = gpt2_tokenizer()
    return [t for d in docs for t in enc.encode_ordinary(d) + [enc.eot_token]]


def read_tar_blocks(path):
    with open(path, "rb") as f:
        files = ({**m, "__url__": str(path)} for m in tar_file_iterator(f))
        return [(s["__key__"], np.load(io.BytesIO(s["npy"]))) for s in group_by_keys(files)]


@pytest.fixture
def shards(tmp_path):
    """A shard set of several small shards; returns (directory, index)."""
    out = tmp_path / "shards"
    index = write_token_shards(DOCS, str(out), BLOCK_LEN, BLOCKS_PER_SHARD, source="test docs")
    return out, index


# --------------------------------------------------------------------------- writing


def test_round_trip_blocks_equal_the_token_stream(shards):
    out, index = shards
    blocks = []
    for shard in index["shards"]:
        samples = read_tar_blocks(out / shard["name"])
        assert len(samples) == shard["samples"]
        blocks += samples
    assert [k for k, _ in blocks] == [f"{i:09d}" for i in range(len(blocks))]
    assert all(b.dtype == np.uint16 and b.shape == (BLOCK_LEN,) for _, b in blocks)
    got = np.concatenate([b for _, b in blocks]).tolist()
    expected = token_stream(DOCS)
    whole = len(expected) // BLOCK_LEN * BLOCK_LEN
    assert got == expected[:whole]
    joined = "".join(d + "<|endoftext|>" for d in DOCS).encode("utf-8")
    assert joined.startswith(gpt2_tokenizer().decode_bytes(got))


def test_index_contents(shards):
    out, index = shards
    n_tokens = len(token_stream(DOCS))
    n_blocks = n_tokens // BLOCK_LEN
    assert json.loads((out / "index.json").read_text()) == index
    assert index["format"] == "token-blocks" and index["version"] == 2
    assert index["block_len"] == BLOCK_LEN and index["dtype"] == "uint16"
    assert index["tokenizer"] == TokenizerSpec().load().identity()
    for name in ("encoder.json", "vocab.bpe"):  # the shard set carries its tokenizer
        assert (out / "tokenizer" / name).read_bytes() == (gpt2_files_dir() / name).read_bytes()
    assert index["total_blocks"] == n_blocks and index["dropped_tokens"] == n_tokens - n_blocks * BLOCK_LEN
    assert index["documents"] == len(DOCS) and index["source"] == "test docs"
    counts = [s["samples"] for s in index["shards"]]
    assert len(counts) >= 3 and sum(counts) == n_blocks
    assert all(c == BLOCKS_PER_SHARD for c in counts[:-1]) and 1 <= counts[-1] <= BLOCKS_PER_SHARD
    assert [s["name"] for s in index["shards"]] == [f"shard-{i:06d}.tar" for i in range(len(counts))]


def test_fsspec_url_output_is_byte_identical(tmp_path, shards):
    out, index = shards
    write_token_shards(DOCS, f"file://{tmp_path}/url", BLOCK_LEN, BLOCKS_PER_SHARD, source="test docs")
    for s in index["shards"]:
        assert (tmp_path / "url" / s["name"]).read_bytes() == (out / s["name"]).read_bytes()


def test_check_token_index_refuses_an_index_without_a_tokenizer_identity_or_with_a_larger_vocabulary(shards):
    _, index = shards
    assert check_token_index(index, SEQ_LEN, 50257) == np.uint16
    with pytest.raises(UserError, match=r"50257-token vocabulary but model\.vocab_size=50000: set model\.vocab_size"):
        check_token_index(index, SEQ_LEN, 50000)
    older = {**index, "tokenizer": {"name": "gpt2", "vocab_size": 50257, "eot": 50256}}  # version 1's record
    for bad in (older, {k: v for k, v in index.items() if k != "tokenizer"}):
        with pytest.raises(UserError, match="index has no valid tokenizer identity.*tools/prepare_text.py"):
            check_token_index(bad, SEQ_LEN, VOCAB)


def test_too_little_text_for_one_block(tmp_path):
    with pytest.raises(UserError, match="block_len=4096"):
        write_token_shards(["tiny"], str(tmp_path / "x"), 4096, 4)


# --------------------------------------------------------------------------- stdlib corpus

SMALL = 200_000


def test_stdlib_documents_are_deterministic_and_sized():
    docs = list(stdlib_documents(SMALL))
    assert docs == list(stdlib_documents(SMALL))
    assert sum(len(d.encode("utf-8")) for d in docs) == SMALL


def test_prepare_stdlib_corpus_is_idempotent_english_and_shared(tmp_path):
    cache = str(tmp_path / "cache")
    directory = prepare_stdlib_corpus(cache, BLOCK_LEN, 256, SMALL, is_preparer=True)
    index_file = Path(directory, "index.json")
    index = json.loads(index_file.read_text())
    assert len(index["shards"]) >= 3 and index["block_len"] == BLOCK_LEN
    assert os.listdir(cache) == [Path(directory).name]  # no temp dir left behind
    stamp = index_file.stat().st_mtime_ns
    start = time.monotonic()
    assert prepare_stdlib_corpus(cache, BLOCK_LEN, 256, SMALL, is_preparer=True) == directory
    waited = prepare_stdlib_corpus(cache, BLOCK_LEN, 256, SMALL, is_preparer=False, wait_timeout_s=0)
    assert waited == directory
    assert time.monotonic() - start < 1 and index_file.stat().st_mtime_ns == stamp
    first = read_tar_blocks(Path(directory, "shard-000000.tar"))[:40]
    words = gpt2_tokenizer().decode(np.concatenate([b for _, b in first]).tolist()).split()
    assert sum(w.lower() in {"the", "of", "to", "a", "is", "and", "in"} for w in words) >= 30
    blocks = [b for i in range(len(index["shards"])) for _, b in read_tar_blocks(Path(directory, f"shard-{i:06d}.tar"))]
    text = gpt2_tokenizer().decode(np.concatenate(blocks).tolist())
    assert "Record of phased-in incompatible language changes" in text  # __future__'s docstring
    assert not text.startswith("Record of phased-in")  # documents are shuffled, not in file order


def test_non_preparer_times_out_naming_the_directory(tmp_path):
    with pytest.raises(UserError, match=f"{tmp_path}.*index.json"):
        prepare_stdlib_corpus(
            str(tmp_path), BLOCK_LEN, 256, SMALL, is_preparer=False, wait_timeout_s=0.1, poll_interval_s=0.02
        )


def test_preparer_that_loses_the_rename_race_uses_the_winner(tmp_path, monkeypatch):
    final = tmp_path / embedded.stdlib_corpus_name(BLOCK_LEN, SMALL)
    real = embedded.write_token_shards

    def write_then_get_overtaken(documents, output, *args, **kw):
        index = real(documents, output, *args, **kw)
        shutil.copytree(output, final)  # another process finishes first
        (final / "winner").touch()
        return index

    monkeypatch.setattr(embedded, "write_token_shards", write_then_get_overtaken)
    assert prepare_stdlib_corpus(str(tmp_path), BLOCK_LEN, 256, SMALL, is_preparer=True) == str(final)
    assert (final / "winner").exists() and os.listdir(tmp_path) == [final.name]


# --------------------------------------------------------------------------- reading


def test_document_mask_gives_each_token_its_document_counted_from_eos(shards):
    """data.document_mask: the training batches carry document_ids, which step by one after each
    EOS of the data's tokenizer and nowhere else; off, the batches are as before."""
    out, index = shards
    eos = index["tokenizer"]["eos"]

    def first_batch(document_mask: bool) -> dict:
        cfg = DataConfig(source="shards", urls=f"{out}/shard-{{000000..{len(index['shards']) - 1:06d}}}.tar")
        cfg.num_workers, cfg.shuffle_buffer, cfg.document_mask = 0, 1, document_mask
        kwargs = dict(
            seq_len=SEQ_LEN,
            vocab_size=VOCAB,
            batch_size=index["total_blocks"],
            rank=0,
            world_size=1,
            local_rank=0,
            seed=0,
        )
        with contextlib.closing(iter(build_text_loader(cfg, **kwargs))) as batches:
            return next(batches)

    plain, masked = first_batch(False), first_batch(True)
    assert plain.keys() == {"input_ids", "labels"} and masked.keys() == {"input_ids", "labels", "document_ids"}
    assert torch.equal(plain["input_ids"], masked["input_ids"])
    ids, docs = masked["input_ids"], masked["document_ids"]
    assert (docs[:, 0] == 0).all()
    steps = docs[:, 1:] - docs[:, :-1]
    assert torch.equal(steps, (ids[:, :-1] == eos).long())
    assert steps.sum() >= 3  # most of the five documents' EOS fall inside the inputs


def test_document_mask_is_refused_for_images():
    cfg = DataConfig(source="digits", document_mask=True)
    with pytest.raises(UserError, match=r"^data.document_mask=true is for language models"):
        build_image_loader(cfg, image_size=8, batch_size=2, rank=0, world_size=1, local_rank=0, seed=0, train=True)
