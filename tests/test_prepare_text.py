"""tools/prepare_text.py and the preparation behind it: inputs, parallel tokenization, shard
sizes, resuming an interrupted run, and bad inputs named in one line."""

import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import train_bpe, train_sentencepiece
from webdataset.tariterators import group_by_keys, tar_file_iterator

from pretrain.data.storage import INDEX_NAME, parse_storage_options
from pretrain.data.tokenizer import TOKENIZER_DIR, TokenizerSpec, gpt2_tokenizer, load_recorded_tokenizer
from pretrain.errors import UserError
from pretrain.prepare.documents import find_input_files, input_documents
from pretrain.prepare.text import (
    block_dtype,
    blocks_per_shard_for,
    prepare_text_files,
    prepare_token_shards,
    shard_bytes,
)
from pretrain.prepare.writer import PROGRESS_NAME

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "tools" / "prepare_text.py"
BLOCK_LEN = 17
BLOCKS_PER_SHARD = 4
UINT16 = np.dtype(np.uint16)
# About 70 blocks of 17 tokens: ~18 shards of 4, enough to interrupt a run in the middle.
DOCS = [
    f"Document {i}: "
    + "the quick brown fox jumps over the lazy dog. " * (i % 4 + 1)
    + ("naïve café, 日本語, 🚀" if i % 7 == 0 else "")
    for i in range(30)
]


def token_stream(docs: list[str]) -> list[int]:
    enc = gpt2_tokenizer()
    return [t for d in docs for t in enc.encode_ordinary(d) + [enc.eot_token]]


def expected_blocks(docs: list[str]) -> list[int]:
    """The tokens the shards must hold: the documents' stream, cut to whole blocks."""
    stream = token_stream(docs)
    return stream[: len(stream) // BLOCK_LEN * BLOCK_LEN]


def shard_tokens(fs: fsspec.AbstractFileSystem, root: str, index: dict) -> list[int]:
    """All blocks of the indexed shards in order, checking keys, counts, dtype and shape."""
    blocks = []
    for shard in index["shards"]:
        with fs.open(f"{root}/{shard['name']}", "rb") as f:
            members = ({**m, "__url__": shard["name"]} for m in tar_file_iterator(f))
            samples = list(group_by_keys(members))
        assert len(samples) == shard["samples"]
        blocks += [(s["__key__"], np.load(io.BytesIO(s["npy"]))) for s in samples]
    assert [k for k, _ in blocks] == [f"{i:09d}" for i in range(len(blocks))]
    assert all(b.dtype == UINT16 and b.shape == (BLOCK_LEN,) for _, b in blocks)
    return np.concatenate([b for _, b in blocks]).tolist()


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def prepare_docs(docs, output, **kw):
    """Shards from an in-memory document list that is always described as the same input, in
    small tokenization tasks, so that an interruption comes after some shards are finished."""
    kw.setdefault("chunk_chars", 50)
    return prepare_token_shards(docs, str(output), BLOCK_LEN, BLOCKS_PER_SHARD, identity="DOCS", **kw)


def interrupted(docs, after):
    """A document source that fails part-way, as a run would be cut short."""
    yield from docs[:after]
    raise RuntimeError("interrupted")


def load_cli():
    spec = importlib.util.spec_from_file_location("prepare_text_cli", CLI)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- round trips


def test_s3_jsonl_and_parquet_round_trip_through_the_cli(s3):
    fs = fsspec.filesystem("s3", **s3.storage_options)
    root = f"{s3.bucket}/roundtrip"
    with fs.open(f"{root}/in/a.jsonl", "wb") as f:
        f.write(b"".join(json.dumps({"body": d}).encode() + b"\n" for d in DOCS[:12]) + b"\n")  # blank line
    pq.write_table(pa.table({"id": list(range(12, 30)), "body": DOCS[12:]}), f"{root}/in/b.parquet", filesystem=fs)
    fs.pipe(f"{root}/in/notes.md", b"not an input")
    options = [
        f"--storage-option=endpoint_url={s3.endpoint}",
        "--storage-option",
        "key=testing",
        "--storage-option",
        "secret=testing",
    ]
    code = load_cli().main(
        [
            s3.url("roundtrip/in"),
            "--output",
            s3.url("roundtrip/out"),
            "--block-len",
            str(BLOCK_LEN),
            "--blocks-per-shard",
            str(BLOCKS_PER_SHARD),
            "--text-field",
            "body",
            "--workers",
            "1",
            "--no-progress",
            *options,
        ]
    )
    assert code == 0
    fs.invalidate_cache()
    index = json.loads(fs.cat(f"{root}/out/{INDEX_NAME}"))
    assert shard_tokens(fs, f"{root}/out", index) == expected_blocks(DOCS)
    assert index["documents"] == len(DOCS) and index["total_blocks"] * BLOCK_LEN == len(expected_blocks(DOCS))
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{root}/out")) == sorted(
        [INDEX_NAME, TOKENIZER_DIR] + [s["name"] for s in index["shards"]]
    )  # no progress file or partial shard left behind


def save_dataset(path: Path, columns: dict, num_shards: int = 1) -> Path:
    """A Hugging Face `datasets` directory, written by save_to_disk as a user would."""
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    datasets.Dataset.from_dict(columns).save_to_disk(str(path), num_shards=num_shards)
    return path


def test_a_saved_datasets_directory_round_trips_through_the_cli_in_its_row_order(tmp_path):
    """save_to_disk in 3 Arrow files (and a stray cache file, which is not a row of the dataset);
    --text-field names the column."""
    ids = list(range(len(DOCS)))
    dataset = save_dataset(tmp_path / "ds", {"id": ids, "body": DOCS}, num_shards=3)
    pq.write_table(pa.table({"body": ["cached, not a row"]}), tmp_path / "cache.parquet")
    (dataset / "cache-0123.arrow").write_bytes((tmp_path / "cache.parquet").read_bytes())
    files = find_input_files([str(dataset)])
    assert [Path(f.path).name for f in files] == [f"data-0000{i}-of-00003.arrow" for i in range(3)]
    assert list(input_documents(files, "body")) == DOCS
    out = tmp_path / "out"
    options = ["--block-len", str(BLOCK_LEN), "--blocks-per-shard", str(BLOCKS_PER_SHARD), "--text-field", "body"]
    assert load_cli().main([str(dataset), "--output", str(out), *options, "--workers", "1", "--no-progress"]) == 0
    fs = fsspec.filesystem("file")
    index = json.loads((out / INDEX_NAME).read_text())
    assert shard_tokens(fs, str(out), index) == expected_blocks(DOCS)
    assert index["documents"] == len(DOCS)


@pytest.mark.parametrize(
    "kind, eos_token, bos_token, bos",
    [("hf", None, None, 1), ("hf", "<pad>", "", None), ("sentencepiece", None, None, 1)],
)
def test_each_tokenizer_kind_round_trips_through_the_cli_with_bos_and_eos(tmp_path, kind, eos_token, bos_token, bos):
    """Blocks split at EOS are the documents, each [BOS] + its tokens; the index records the
    tokenizer and the shard set carries a copy of its files, which decodes them."""
    path = train_bpe(tmp_path / "bpe") if kind == "hf" else train_sentencepiece(tmp_path / "sp.model")
    corpus = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    out = tmp_path / "out"
    options = [*(["--eos-token", eos_token] if eos_token else []), *(["--bos-token", ""] if bos_token == "" else [])]
    sizes = ["--block-len", str(BLOCK_LEN), "--blocks-per-shard", str(BLOCKS_PER_SHARD), "--workers", "1"]
    args = [str(corpus), "--output", str(out), "--tokenizer", str(path), *options, *sizes, "--no-progress"]
    assert load_cli().main(args) == 0
    index = json.loads((out / INDEX_NAME).read_text())
    tokenizer = TokenizerSpec(str(path), eos_token, bos_token).load()
    assert index["tokenizer"] == tokenizer.identity() and index["tokenizer"]["bos"] == bos
    copy = load_recorded_tokenizer({**index["tokenizer"], "url": str(out / TOKENIZER_DIR)}, {})
    stream = np.array(shard_tokens(fsspec.filesystem("file"), str(out), index))
    ends = np.flatnonzero(stream == tokenizer.eos_id)
    documents = np.split(stream, ends + 1)[: len(ends)]  # each up to its EOS; the cut-off last one dropped
    assert len(documents) >= 20
    for got, doc in zip(documents, DOCS, strict=False):
        assert got[-1] == tokenizer.eos_id and (bos is None or got[0] == bos)
        assert copy.decode(got[0 if bos is None else 1 : -1].tolist()) == doc


def test_another_tokenizer_never_resumes_a_preparation(tmp_path):
    """Other tokenizer files at the same path (same vocabulary size), or the same files with
    another BOS, are another preparation: the interrupted run's shards are not continued."""
    out = tmp_path / "out"
    path = train_bpe(tmp_path / "bpe")
    with pytest.raises(RuntimeError):
        prepare_docs(interrupted(DOCS, 20), out, tokenizer=TokenizerSpec(str(path)))
    progress = rf"{re.escape(str(out))}/_progress.json is from a different preparation"
    with pytest.raises(UserError, match=progress):
        prepare_docs(DOCS, out, tokenizer=TokenizerSpec(str(path), bos_token=""))
    train_bpe(tmp_path / "bpe", seed=1)
    with pytest.raises(UserError, match=progress):
        prepare_docs(DOCS, out, tokenizer=TokenizerSpec(str(path)))


def test_parquet_is_read_in_record_batches(tmp_path):
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "docs.parquet", row_group_size=7)
    files = find_input_files([str(tmp_path / "docs.parquet")])
    assert list(input_documents(files, parquet_batch_rows=3)) == DOCS


@pytest.mark.slow
def test_workers_1_and_2_write_byte_identical_shards(tmp_path):
    corpus = write_jsonl(tmp_path / "docs.jsonl", DOCS * 3)
    results = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        results[workers] = prepare_text_files(
            [str(corpus)], str(out), BLOCK_LEN, BLOCKS_PER_SHARD, workers=workers, chunk_chars=300
        ).index
        assert shard_tokens(fsspec.filesystem("file"), str(out), results[workers]) == expected_blocks(DOCS * 3)
    assert results[1] == results[2]
    for shard in results[1]["shards"]:
        assert (tmp_path / "out1" / shard["name"]).read_bytes() == (tmp_path / "out2" / shard["name"]).read_bytes()


# --------------------------------------------------------------------------- shard size


@pytest.mark.parametrize("block_len, target", [(17, 20_000), (1025, 2**20), (1025, 2**20 + 10240)])
def test_shard_size_target_is_met_at_whole_blocks(block_len, target):
    n = blocks_per_shard_for(target, block_len, UINT16)
    assert shard_bytes(n, block_len, UINT16) <= target < shard_bytes(n + 1, block_len, UINT16)


def test_predicted_shard_bytes_are_the_written_ones(tmp_path):
    index = prepare_docs(DOCS, tmp_path / "out").index
    sizes = {s["samples"]: (tmp_path / "out" / s["name"]).stat().st_size for s in index["shards"]}
    assert all(size == shard_bytes(n, BLOCK_LEN, UINT16) for n, size in sizes.items())


def test_shard_size_below_one_block():
    with pytest.raises(UserError, match="cannot hold one block of block_len=1025.*--shard-size-mb"):
        blocks_per_shard_for(2048, 1025, block_dtype(50257))


# --------------------------------------------------------------------------- resuming


def versioned_bucket(s3, name: str) -> fsspec.AbstractFileSystem:
    """A bucket that keeps every version of an object: a server-side count of writes per key."""
    fs = fsspec.filesystem("s3", **s3.storage_options)
    fs.mkdir(name)
    fs.call_s3("put_bucket_versioning", Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return fs


def writes_per_key(fs, bucket: str, prefix: str) -> dict[str, int]:
    versions = fs.call_s3("list_object_versions", Bucket=bucket, Prefix=prefix).get("Versions", [])
    counts: dict[str, int] = {}
    for v in versions:
        counts[v["Key"].rsplit("/", 1)[1]] = counts.get(v["Key"].rsplit("/", 1)[1], 0) + 1
    return counts


@pytest.mark.slow
def test_interrupted_s3_run_resumes_without_rewriting_finished_shards(s3):
    bucket = "whitebox-versioned"
    fs = versioned_bucket(s3, bucket)
    clean = prepare_docs(DOCS, f"s3://{bucket}/clean", storage_options=s3.storage_options).index
    out = f"s3://{bucket}/run"
    with pytest.raises(RuntimeError, match="interrupted"):
        prepare_docs(interrupted(DOCS, 20), out, storage_options=s3.storage_options)
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}/run/{INDEX_NAME}")
    finished = [s["name"] for s in json.loads(fs.cat(f"{bucket}/run/{PROGRESS_NAME}"))["shards"]]
    assert 2 <= len(finished) < len(clean["shards"]) - 1

    result = prepare_docs(DOCS, out, storage_options=s3.storage_options, workers=2, chunk_chars=200)

    assert (result.skipped, result.written) == (len(finished), len(clean["shards"]) - len(finished))
    assert result.index == clean
    fs.invalidate_cache()
    for shard in clean["shards"]:
        assert fs.cat(f"{bucket}/run/{shard['name']}") == fs.cat(f"{bucket}/clean/{shard['name']}")
    writes = writes_per_key(fs, bucket, "run/")
    assert all(writes[name] == 1 for name in finished)  # written once, by the interrupted run
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{bucket}/run")) == sorted(
        [INDEX_NAME, TOKENIZER_DIR] + [s["name"] for s in clean["shards"]]
    )


def test_shard_deleted_after_interruption_is_written_again(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        prepare_docs(interrupted(DOCS, 20), out)
    finished = [s["name"] for s in json.loads((out / PROGRESS_NAME).read_text())["shards"]]
    (out / finished[-1]).unlink()
    kept = {name: (out / name).stat().st_mtime_ns for name in finished[:-1]}
    result = prepare_docs(DOCS, out)
    assert result.skipped == len(finished) - 1
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept
    assert shard_tokens(fsspec.filesystem("file"), str(out), result.index) == expected_blocks(DOCS)


def test_complete_output_is_reported_done_and_left_alone(tmp_path):
    first = prepare_docs(DOCS, tmp_path / "out")
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    again = prepare_docs(DOCS, tmp_path / "out")
    assert again.already_done and again.index == first.index and again.written == 0
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == stamps


def test_inputs_changed_since_the_interruption(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        prepare_docs(interrupted(DOCS, 20), out)
    with pytest.raises(UserError, match=rf"{re.escape(str(out))}/shard-000000.tar was finished .* inputs changed"):
        prepare_docs([d.upper() for d in DOCS], out)  # same identity, other text: caught by the blocks' hash


def test_changed_input_file_is_another_preparation(tmp_path):
    corpus = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    out = tmp_path / "out"
    prepare_text_files([str(corpus)], str(out), BLOCK_LEN, BLOCKS_PER_SHARD)
    write_jsonl(corpus, DOCS[:-1])
    with pytest.raises(UserError, match=rf"{re.escape(str(out))}/index.json is from a different preparation"):
        prepare_text_files([str(corpus)], str(out), BLOCK_LEN, BLOCKS_PER_SHARD)


def test_other_settings_are_refused_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        prepare_docs(interrupted(DOCS, 20), out)
    with pytest.raises(
        UserError, match=rf"{re.escape(str(out))}/_progress.json is from a different preparation.*--overwrite"
    ):
        prepare_token_shards(DOCS, str(out), BLOCK_LEN, 2, identity="DOCS")
    index = prepare_token_shards(DOCS, str(out), BLOCK_LEN, 2, identity="DOCS", overwrite=True).index
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [INDEX_NAME, TOKENIZER_DIR] + [s["name"] for s in index["shards"]]
    )
    with pytest.raises(UserError, match=rf"{re.escape(str(out))}/index.json is from a different preparation"):
        prepare_docs(DOCS, out)


def test_foreign_shards_are_not_overwritten_silently(tmp_path):
    (tmp_path / "shard-000000.tar").write_bytes(b"someone else's")
    with pytest.raises(UserError, match=f"{re.escape(str(tmp_path))} holds shard files but no index.json"):
        prepare_docs(DOCS, tmp_path)


# --------------------------------------------------------------------------- bad inputs


def write_bad_jsonl(tmp_path, third_line):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "one"}) + "\n\n" + third_line + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: write_bad_jsonl(p, '{"body": "no text field"}'), "{} line 3 has no field 'text'"),
        (lambda p: write_bad_jsonl(p, '{"text": "unterminated'), "{} line 3 is not valid JSON"),
        (lambda p: write_bad_jsonl(p, '{"text": 42}'), "{} line 3: field 'text' is int, not a string"),
        (
            lambda p: pq.write_table(pa.table({"body": ["x"]}), p / "t.parquet") or p / "t.parquet",
            "{} has no column 'text' (it has: body)",
        ),
        (
            lambda p: pq.write_table(pa.table({"text": ["x", None]}), p / "t.parquet") or p / "t.parquet",
            "{} row 2: column 'text' is null",
        ),
        (lambda p: (p / "t.parquet").write_bytes(b"not parquet") and p / "t.parquet", "cannot read {} as Parquet"),
        (lambda p: (p / "t.txt").write_bytes(b"\xff\xfe bad utf-8") and p / "t.txt", "cannot read {} as UTF-8"),
        (
            lambda p: (p / "t.csv").write_text("a,b") and p / "t.csv",
            "input {} is not a .txt, .jsonl, .parquet or .arrow",
        ),
        (
            lambda p: save_dataset(p / "ds", {"body": ["x"]}),
            "data-00000-of-00001.arrow has no column 'text' (it has: body)",
        ),
        (lambda p: (p / "t.arrow").write_bytes(b"not arrow") and p / "t.arrow", "cannot read {} as an Arrow stream"),
        (
            lambda p: (
                save_dataset(p / "dd" / "train", {"text": ["x"]})
                .parent.joinpath("dataset_dict.json")
                .write_text('{"splits": ["train"]}')
                and p / "dd"
            ),
            "input {} is a datasets DatasetDict (splits: train): pass one split's directory, e.g. {}/train",
        ),
        (lambda p: p / "missing.jsonl", "input {} does not exist"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "input {} holds or matches no"),
        (lambda p: p / "*.jsonl", "input {} holds or matches no"),
    ],
    ids=[
        "no-field",
        "bad-json",
        "not-string",
        "no-column",
        "null-row",
        "bad-parquet",
        "bad-utf8",
        "suffix",
        "arrow-no-column",
        "bad-arrow",
        "dataset-dict",
        "missing",
        "empty-dir",
        "empty-glob",
    ],
)
def test_bad_input_is_named(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(UserError) as err:
        prepare_text_files([str(path)], str(tmp_path / "out"), BLOCK_LEN, BLOCKS_PER_SHARD)
    assert message.format(path, path) in str(err.value) and "\n" not in str(err.value)


def test_missing_s3_input_is_named(s3):
    with pytest.raises(UserError, match=re.escape(f"input {s3.url('nowhere/x.jsonl')} does not exist")):
        find_input_files([s3.url("nowhere/x.jsonl")], s3.storage_options)


def test_storage_option_must_be_key_value():
    assert parse_storage_options(["anon=true", "endpoint_url=http://h:9", 'client_kwargs={"a": 1}']) == {
        "anon": True,
        "endpoint_url": "http://h:9",
        "client_kwargs": {"a": 1},
    }
    with pytest.raises(UserError, match="--storage-option 'endpoint_url' is not KEY=VALUE"):
        parse_storage_options(["endpoint_url"])


# --------------------------------------------------------------------------- the CLI as users run it


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, str(CLI), *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.slow
def test_cli_end_to_end_on_local_files(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    for i, doc in enumerate(DOCS[:5]):
        (corpus / ("sub" if i % 2 else "") / f"doc{i}.txt").write_text(doc, encoding="utf-8")
    write_jsonl(corpus / "sub" / "more.jsonl", DOCS[5:15])
    pq.write_table(pa.table({"text": DOCS[15:]}), corpus / "rest.parquet")
    (corpus / "ignored.md").write_text("not an input")
    write_jsonl(tmp_path / "extra.jsonl", DOCS[:3])
    out = tmp_path / "out"
    target = 20_000
    args = [
        str(corpus),
        str(tmp_path / "*.jsonl"),
        "--output",
        str(out),
        "--block-len",
        str(BLOCK_LEN),
        "--shard-size-mb",
        str(target / 2**20),
        "--workers",
        "2",
        "--chunk-chars",
        "500",
    ]

    run = run_cli(args)
    assert run.returncode == 0, run.stderr
    index = json.loads((out / INDEX_NAME).read_text())
    docs = [DOCS[i] for i in (0, 2, 4, 15, *range(16, 30), 1, 3, *range(5, 15))] + DOCS[:3]  # sorted file order
    assert shard_tokens(fsspec.filesystem("file"), str(out), index) == expected_blocks(docs)
    assert index["documents"] == len(docs) and len(index["shards"]) >= 2
    assert all((out / s["name"]).stat().st_size <= target for s in index["shards"])
    assert run.stdout.strip() == (
        f"wrote {len(index['shards'])} shards (0 finished earlier, skipped), {index['total_blocks']} blocks, "
        f"{index['total_tokens']} tokens ({index['dropped_tokens']} dropped) to {out}"
    )
    assert "tokens:" in run.stderr  # the progress bar

    again = run_cli(args + ["--no-progress"])
    assert again.returncode == 0 and "was already complete" in again.stdout and again.stderr == ""

    bad = run_cli([str(tmp_path / "nope")] + args[2:])
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().count("\n") == 0 and f"{tmp_path / 'nope'} does not exist" in bad.stderr
