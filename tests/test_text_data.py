"""Text shards: writing, reading back, rank split, endless epochs, exact resume, bad inputs."""

import io
import itertools
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from webdataset.tariterators import group_by_keys, tar_file_iterator

import pretrain.data.text as text
from pretrain.config import DataConfig
from pretrain.data import build_text_stream
from pretrain.data.shards import TokenBlockStream, expand_urls, read_index
from pretrain.data.text import prepare_stdlib_corpus, stdlib_documents, write_token_shards
from pretrain.data.tokenizer import gpt2_tokenizer
from pretrain.errors import UserError

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


def shard_pattern(directory, n):
    return f"{directory}/shard-{{000000..{n - 1:06d}}}.tar"


@pytest.fixture
def shards(tmp_path):
    """A shard set of several small shards; returns (directory, index)."""
    out = tmp_path / "shards"
    index = write_token_shards(DOCS, str(out), BLOCK_LEN, BLOCKS_PER_SHARD, source="test docs")
    return out, index


def stream(directory, index, **kw):
    args = dict(seq_len=SEQ_LEN, vocab_size=VOCAB, batch_size=3, rank=0, world_size=1, seed=7)
    args.update(kw)
    return TokenBlockStream(shard_pattern(directory, len(index["shards"])), **args)


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
    assert index["format"] == "token-blocks" and index["version"] == 1
    assert index["block_len"] == BLOCK_LEN and index["dtype"] == "uint16"
    assert index["tokenizer"] == {"name": "gpt2", "vocab_size": 50257, "eot": 50256}
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


def test_too_little_text_for_one_block(tmp_path):
    with pytest.raises(UserError, match="block_len=4096"):
        write_token_shards(["tiny"], str(tmp_path / "x"), 4096, 4)


def test_cli_writes_shards_and_rejects_missing_input(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    for i, doc in enumerate(DOCS):
        (corpus / ("sub" if i % 2 else "") / f"doc{i}.txt").write_text(doc, encoding="utf-8")
    (corpus / "ignored.md").write_text("not a .txt file")
    cmd = [sys.executable, str(REPO / "tools/prepare_text.py")]
    out = tmp_path / "out"
    args = ["--output", str(out), "--block-len", str(BLOCK_LEN), "--blocks-per-shard", "4", "--no-progress"]
    run = subprocess.run(cmd + [str(corpus)] + args, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    index = json.loads((out / "index.json").read_text())
    assert index["documents"] == len(DOCS) and len(index["shards"]) >= 3
    assert run.stdout.strip() == (
        f"wrote {len(index['shards'])} shards, {index['total_blocks']} blocks, "
        f"{index['total_tokens']} tokens ({index['dropped_tokens']} dropped) to {out}"
    )
    bad = subprocess.run(cmd + [str(tmp_path / "nope")] + args, capture_output=True, text=True, check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "nope" in bad.stderr


# --------------------------------------------------------------------------- reading


def blocks_of(batches):
    """The (B, seq_len+1) token rows behind batches, checking labels are inputs shifted by one."""
    rows = []
    for b in batches:
        assert b["input_ids"].shape == b["labels"].shape == (b["input_ids"].shape[0], SEQ_LEN)
        assert (b["labels"][:, :-1] == b["input_ids"][:, 1:]).all()
        rows += [tuple(x) + (y,) for x, y in zip(b["input_ids"].tolist(), b["labels"][:, -1].tolist())]
    return rows


def shard_blocks(directory, names):
    return [tuple(b.tolist()) for n in names for _, b in read_tar_blocks(Path(directory) / n)]


def test_ranks_read_disjoint_shards_covering_all(shards):
    out, index = shards
    seen = []
    for rank in range(2):
        s = stream(out, index, rank=rank, world_size=2, batch_size=1)
        names = [Path(u).name for u in s.shard_urls]
        seen += names
        epoch = sum(x["samples"] for x in index["shards"] if x["name"] in names)
        got = blocks_of(itertools.islice(s, epoch))
        assert sorted(got) == sorted(shard_blocks(out, names))
    assert sorted(seen) == [s["name"] for s in index["shards"]]


def test_stream_is_endless_and_reshuffles_per_epoch(shards):
    out, index = shards
    s = stream(out, index, batch_size=1)
    per_epoch = index["total_blocks"]
    rows = blocks_of(itertools.islice(s, 3 * per_epoch + 2))
    epochs = [rows[i * per_epoch : (i + 1) * per_epoch] for i in range(3)]
    assert all(sorted(e) == sorted(shard_blocks(out, [x["name"] for x in index["shards"]])) for e in epochs)
    assert len({tuple(s.epoch_order(e)) for e in range(4)}) > 1
    assert s.state_dict()["epoch"] == 3


@pytest.mark.parametrize("k", [0, 1, 2, 5, 9])
def test_exact_resume(shards, k):
    out, index = shards
    first = stream(out, index)
    it = iter(first)
    for _ in range(k):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))
    expected = [next(it) for _ in range(6)]
    second = stream(out, index)
    second.load_state_dict(state)
    got = list(itertools.islice(second, 6))
    for a, b in zip(expected, got):
        assert (a["input_ids"] == b["input_ids"]).all() and (a["labels"] == b["labels"]).all()


def test_resume_with_other_world_size_says_data_changed(shards):
    out, index = shards
    state = stream(out, index).state_dict()
    other = stream(out, index, rank=1, world_size=2)
    with pytest.raises(UserError, match="data changed since the checkpoint.*world_size 1 -> 2"):
        other.load_state_dict(state)


# --------------------------------------------------------------------------- bad inputs


def test_missing_index(shards):
    out, index = shards
    (out / "index.json").unlink()
    with pytest.raises(UserError, match=r"index\.json not found.*tools/prepare_text\.py"):
        stream(out, index)


def test_block_len_mismatch(shards):
    out, index = shards
    with pytest.raises(UserError, match=r"block_len=17.*model\.seq_len=32"):
        stream(out, index, seq_len=32)
    with pytest.raises(UserError, match=r"50257-token vocabulary but model\.vocab_size=1000"):
        stream(out, index, vocab_size=1000)


def test_fewer_shards_than_ranks(shards):
    out, index = shards
    n = len(index["shards"])
    with pytest.raises(UserError, match=f"{n} shards for {n + 1} ranks"):
        stream(out, index, world_size=n + 1)


def test_shard_not_in_index(shards):
    out, index = shards
    with pytest.raises(UserError, match="shard-000099.tar is not listed"):
        TokenBlockStream(
            f"{out}/shard-{{000000,000099}}.tar", seq_len=SEQ_LEN, vocab_size=VOCAB, batch_size=1, rank=0, world_size=1, seed=0
        )


def test_deleted_shard_is_named_when_read(shards):
    out, index = shards
    (out / "shard-000001.tar").unlink()
    with pytest.raises(UserError, match="cannot read shard .*shard-000001.tar"):
        list(itertools.islice(stream(out, index), index["total_blocks"]))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "bad_npy"])
def test_corrupt_shard_is_named(shards, damage):
    out, index = shards
    path = out / "shard-000001.tar"
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"\x00not a tar file at all" * 40)
    elif damage == "truncated":
        path.write_bytes(data[:700])
    else:
        with tarfile.open(path, "w") as tar:
            info = tarfile.TarInfo("000000004.npy")
            info.size = 10
            tar.addfile(info, io.BytesIO(b"not npy!!!"))
    with pytest.raises(UserError, match="shard-000001.tar") as err:
        list(itertools.islice(stream(out, index), index["total_blocks"]))
    assert "\n" not in str(err.value)


def test_index_of_another_format(shards):
    out, index = shards
    (out / "index.json").write_text('{"format": "images"}')
    with pytest.raises(UserError, match="not a token-blocks"):
        read_index(expand_urls(shard_pattern(out, len(index["shards"]))))


def test_empty_urls():
    with pytest.raises(UserError, match="data.urls"):
        expand_urls([])


def build(cfg, **kw):
    args = dict(seq_len=SEQ_LEN, vocab_size=VOCAB, batch_size=1, rank=0, world_size=1, local_rank=0, seed=0)
    args.update(kw)
    return build_text_stream(cfg, **args)


def test_build_stream_needs_urls_for_shards_source(tmp_path):
    for urls in ("???", None):  # the schema's "required" marker, or an explicit null
        with pytest.raises(UserError, match="data.urls is required when data.source=shards"):
            build(DataConfig(source="shards", urls=urls))


def test_build_stream_rejects_unknown_source():
    with pytest.raises(UserError, match="data.source='wiki'.*stdlib, shards"):
        build(DataConfig(source="wiki"))


def test_build_stream_from_shards_config(shards):
    out, index = shards
    cfg = DataConfig(source="shards", urls=[shard_pattern(out, len(index["shards"]))])
    s = build(cfg, batch_size=2, rank=1, world_size=2, local_rank=1)
    assert next(iter(s))["input_ids"].shape == (2, SEQ_LEN)


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
    final = tmp_path / text.stdlib_corpus_name(BLOCK_LEN, SMALL)
    real = text.write_token_shards

    def write_then_get_overtaken(documents, output, *args, **kw):
        index = real(documents, output, *args, **kw)
        shutil.copytree(output, final)  # another process finishes first
        (final / "winner").touch()
        return index

    monkeypatch.setattr(text, "write_token_shards", write_then_get_overtaken)
    assert prepare_stdlib_corpus(str(tmp_path), BLOCK_LEN, 256, SMALL, is_preparer=True) == str(final)
    assert (final / "winner").exists() and os.listdir(tmp_path) == [final.name]


def test_build_stream_from_stdlib(tmp_path):
    mb = SMALL / 2**20
    cfg = DataConfig(source="stdlib", cache_dir=str(tmp_path), stdlib_max_mb=mb, blocks_per_shard=64)
    batch = next(iter(build(cfg, batch_size=4, rank=1, world_size=2, seed=3)))
    assert batch["input_ids"].shape == (4, SEQ_LEN) and batch["input_ids"].dtype == torch.int64
