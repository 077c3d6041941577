"""Streaming shards: every sample once per epoch over ranks x workers, exact resume, bad data,
retries; from local files and from S3 (moto's server through s3fs)."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile

import fsspec
import numpy as np
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem

from pretrain.config import DataConfig, load_config
from pretrain.data.build import build_image_loader, build_text_loader
from pretrain.data.loader import ShardLoader
from pretrain.data.shards import merge_states, read_index
from pretrain.distributed import free_port
from pretrain.errors import UserError
from pretrain.prepare.embedded import digits_samples
from pretrain.prepare.images import prepare_image_shards
from pretrain.prepare.text import write_token_shards

SEQ_LEN, BLOCKS_PER_SHARD, N_SHARDS = 8, 4, 8
IMAGE_SIZE = 12  # digits are 8x8: a random-resized crop upsamples them


def documents() -> list[str]:
    return [" ".join(f"d{i}w{j}" for j in range(i % 5 + 2)) for i in range(30)]  # 14 shards, no two blocks alike


def prepare(output: str, storage_options: dict | None = None) -> dict:
    # Exactly N_SHARDS full shards: cut the documents' token stream to whole shards.
    index = write_token_shards(documents(), output, SEQ_LEN + 1, BLOCKS_PER_SHARD, storage_options=storage_options)
    assert len(index["shards"]) >= N_SHARDS
    return index


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("shards")
    prepare(str(out))
    return str(out)


def prepare_images(output: str, storage_options: dict | None = None) -> dict:
    """N_SHARDS shards of BLOCKS_PER_SHARD digits: the same layout as the text shards."""
    source = digits_samples()
    source = dataclasses.replace(source, items=source.items[: N_SHARDS * BLOCKS_PER_SHARD])
    return prepare_image_shards(source, output, BLOCKS_PER_SHARD, storage_options).index


@pytest.fixture(scope="module")
def local_images(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("images")
    prepare_images(str(out))
    return str(out)


@pytest.fixture(scope="module")
def s3_shards(s3) -> tuple[str, dict]:
    out = s3.url("streaming/shards")
    prepare(out, s3.storage_options)
    return out, s3.storage_options


@pytest.fixture(scope="module")
def s3_images(s3) -> tuple[str, dict]:
    out = s3.url("streaming/images")
    prepare_images(out, s3.storage_options)
    return out, s3.storage_options


def config(root: str, storage_options: dict | None = None, **overrides) -> DataConfig:
    urls = f"{root}/shard-{{000000..{N_SHARDS - 1:06d}}}.tar"
    return DataConfig(
        source="shards",
        urls=urls,
        storage_options=storage_options or {},
        **{"num_workers": 0, "shuffle_buffer": 3, "retry_backoff_s": 0.01, **overrides},
    )


def loader(cfg: DataConfig, rank: int = 0, world: int = 1, batch: int = 2) -> ShardLoader:
    return build_text_loader(
        cfg, seq_len=SEQ_LEN, vocab_size=50304, batch_size=batch, rank=rank, world_size=world, local_rank=rank, seed=5
    )


def image_loader(cfg: DataConfig, rank: int = 0, world: int = 1, batch: int = 2, train: bool = True) -> ShardLoader:
    return build_image_loader(
        cfg, image_size=IMAGE_SIZE, batch_size=batch, rank=rank, world_size=world, local_rank=rank, seed=5, train=train
    )


LOADERS = {"text": loader, "images": image_loader}


def take(batches, n: int) -> list[torch.Tensor]:
    """The next n batches' inputs (token ids or images) with their labels appended, as one tensor
    each, so a comparison covers both."""
    out = []
    for _ in range(n):
        batch = next(batches)
        inputs = batch["input_ids"] if "input_ids" in batch else batch["images"]
        out.append(torch.cat([inputs.flatten(1).double(), batch["labels"].view(len(inputs), -1).double()], 1))
    return out


@pytest.mark.slow
def test_every_sample_once_per_epoch_over_two_ranks_and_two_workers(local_shards):
    """8 shards of 4 samples, 2 ranks x 2 workers: each reader owns 2 shards = 8 samples, and
    the loader alternates workers, so 16 single-sample batches per rank are exactly one epoch."""
    seen = []
    for rank in (0, 1):
        batches = iter(loader(config(local_shards, num_workers=2), rank=rank, world=2, batch=1))
        seen += [tuple(t[0].tolist()) for t in take(batches, 16)]
    all_blocks = [tuple(t[0].tolist()) for t in take(iter(loader(config(local_shards, shuffle_buffer=1), batch=1)), 32)]
    assert len(set(all_blocks)) == 32  # the blocks are distinct, so counting them counts samples
    assert sorted(seen) == sorted(all_blocks)


RESUME_CASES = [
    pytest.param(kind, workers, world, marks=[pytest.mark.slow] if workers else [])  # workers are processes
    for kind, layouts in [("text", [(0, 1), (2, 1), (0, 2), (2, 2)]), ("images", [(0, 1), (2, 2)])]
    for workers, world in layouts
]


@pytest.mark.parametrize("where", ["file", "s3"])
@pytest.mark.parametrize("kind, workers, world", RESUME_CASES)
def test_resume_replays_exactly_mid_shard_at_shard_and_epoch_boundaries(where, kind, workers, world, request):
    fixture = {
        ("text", "file"): "local_shards",
        ("text", "s3"): "s3_shards",
        ("images", "file"): "local_images",
        ("images", "s3"): "s3_images",
    }[kind, where]
    shards = request.getfixturevalue(fixture)
    root, options = (shards, None) if where == "file" else shards
    cfg = config(root, options, num_workers=workers)
    loader = LOADERS[kind]
    # Per reader: 32 / (world x max(1, workers)) samples an epoch; batch 1 makes every cut exact.
    per_epoch = 32 // world
    for rank in range(world):
        for cut in (3, 4 * max(1, workers), per_epoch):  # mid-shard, shard boundary, epoch boundary
            first = loader(cfg, rank, world, batch=1)
            batches = iter(first)
            take(batches, cut)
            state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
            expected = take(batches, 6)
            resumed = loader(cfg, rank, world, batch=1)
            resumed.load_state_dict(state)
            got = take(iter(resumed), 6)
            assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True)), (rank, cut)


def run_steps(
    cfg: DataConfig, layout: tuple[int, int], steps: int, state: dict | None, micro_batches: int = 4
) -> tuple[list[list[tuple]], dict]:
    """`steps` optimizer steps of `micro_batches` single-sample micro-batches over `layout`
    (ranks, workers): each step's samples, sorted, and every rank's data state joined."""
    ranks, workers = layout
    per_step: list[list[tuple]] = [[] for _ in range(steps)]
    states = []
    for rank in range(ranks):
        rank_loader = loader(
            config(cfg.urls.rsplit("/", 1)[0], num_workers=workers, readers=cfg.readers),
            rank=rank,
            world=ranks,
            batch=1,
        )
        if state is not None:
            rank_loader.load_state_dict(state)
        batches = iter(rank_loader)
        for step in range(steps):
            per_step[step] += [tuple(t[0].tolist()) for t in take(batches, micro_batches // ranks)]
        states.append(json.loads(json.dumps(rank_loader.state_dict())))  # as checkpoints store them
    return [sorted(samples) for samples in per_step], merge_states(states)


def test_resharded_resume_takes_the_same_samples_each_step(local_shards):
    """4 logical readers: 2 ranks x 2 workers for 3 steps, then 1 rank in-process for 3, then
    4 ranks x 1 worker for 2 give every step the samples an unbroken 2 x 2 run gives it, over
    an epoch boundary (8 samples per reader)."""
    cfg = config(local_shards, readers=4)
    expected, _ = run_steps(cfg, (2, 2), 8, None)
    first, state = run_steps(cfg, (2, 2), 3, None)
    second, state = run_steps(cfg, (1, 0), 3, state)
    third, _ = run_steps(cfg, (4, 1), 2, state)
    assert first + second + third == expected
    assert len({s for step in expected for s in step}) == 32  # the 32 samples each once in 8 steps of 4


def test_a_layout_that_cannot_share_the_readers_is_refused_naming_a_fix(local_shards):
    _, state = run_steps(config(local_shards, readers=4), (2, 0), 1, None)
    with pytest.raises(
        UserError, match=r"run's 4 logical readers .* 4 ranks x 2 loader workers: set data.num_workers=1"
    ):
        loader(config(local_shards, num_workers=2), rank=0, world=4, batch=1).load_state_dict(state)
    with pytest.raises(
        UserError,
        match=r"data.readers=6 cannot be shared evenly by 4 ranks x 1 loader workers: "
        r"use a number of ranks that divides 6",
    ):
        loader(config(local_shards, readers=6, num_workers=1), rank=0, world=4)
    with pytest.raises(UserError, match=r"batch_size 1 -> 2\): resume with the same shards, train.micro_batch_size"):
        loader(config(local_shards), rank=0, world=2, batch=2).load_state_dict(state)


def test_too_few_shards_for_ranks_and_workers_is_an_error_at_once(local_shards):
    with pytest.raises(UserError, match="8 shards for 2 ranks x 8 loader workers"):
        loader(config(local_shards, num_workers=8), rank=0, world=2)


# --------------------------------------------------------------------------- bad data


def copy_shards(src: str, dst) -> str:
    fs = LocalFileSystem()
    fs.copy(src, str(dst), recursive=True)
    return str(dst)


def replace_member(shard, member_suffix: str, data: bytes) -> None:
    """Rewrite a shard with the first member ending in `member_suffix` replaced by `data`."""
    members = []
    with tarfile.open(shard) as tar:
        for info in tar.getmembers():
            members.append((info, tar.extractfile(info).read()))
    target = next(i for i, (info, _) in enumerate(members) if info.name.endswith(member_suffix))
    with tarfile.open(shard, "w") as tar:
        for i, (info, content) in enumerate(members):
            content = data if i == target else content
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))


def wrong_dtype_block() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(SEQ_LEN + 1, dtype=np.uint32))
    return buffer.getvalue()


def not_a_tar(d) -> None:
    (d / "shard-000005.tar").write_bytes(b"\x00not a tar file at all" * 40)


def not_npy(d) -> None:
    replace_member(d / "shard-000006.tar", ".npy", b"not npy!!!")


def truncate(d) -> None:
    (d / "shard-000002.tar").write_bytes((d / "shard-000002.tar").read_bytes()[:3000])


def cut_shard(where: str):
    """Damage: shard-000002 cut where its third sample's first member starts ("boundary"), 100
    bytes into that member's header ("header"), or 10 bytes into its data ("data")."""

    def damage(d) -> None:
        path = d / "shard-000002.tar"
        with tarfile.open(path) as tar:
            members = tar.getmembers()
        first_of_third = members[2 * len(members) // BLOCKS_PER_SHARD]
        offset = {"boundary": 0, "header": 100, "data": first_of_third.offset_data - first_of_third.offset + 10}
        path.write_bytes(path.read_bytes()[: first_of_third.offset + offset[where]])

    return damage


# kind: (damage, what the error names, samples lost (None: depends on where the tar breaks))
BAD_DATA = {
    "not a tar": ("text", not_a_tar, "shard-000005.tar", None),
    "not a .npy member": ("text", not_npy, "shard-000006.tar member 000000024", 1),
    "missing shard": ("text", lambda d: (d / "shard-000003.tar").unlink(), "shard-000003.tar", 4),
    "truncated tar": ("text", truncate, r"shard-000002.tar \(truncated", None),
    "cut at a member boundary": ("text", cut_shard("boundary"), r"000002.tar \(truncated: it ends after 2 of the 4", 2),
    "cut in a member header": ("text", cut_shard("header"), r"000002.tar \(truncated: it ends after 2 of the 4", 2),
    "cut in a member": ("text", cut_shard("data"), r"000002.tar \(truncated: it ends inside member 000000010.npy", 2),
    "wrong dtype": (
        "text",
        lambda d: replace_member(d / "shard-000001.tar", ".npy", wrong_dtype_block()),
        "shard-000001.tar member 000000004",
        1,
    ),
    "undecodable image": (
        "images",
        lambda d: replace_member(d / "shard-000006.tar", ".png", b"\x89PNG cut short"),
        r"shard-000006.tar member 000000024 \(cannot decode image 000000024.png",
        1,
    ),
    "label out of range": (
        "images",
        lambda d: replace_member(d / "shard-000001.tar", ".cls", b"12"),
        r"shard-000001.tar member 000000004 \(label 000000004.cls .* is '12'",
        1,
    ),
    "truncated image tar": ("images", truncate, r"shard-000002.tar \(truncated", None),
    "image shard cut at a member boundary": (
        "images",
        cut_shard("boundary"),
        r"truncated: it ends after 2 of the 4",
        2,
    ),
}


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_raises_naming_the_shard_or_is_skipped_and_counted(case, workers, request, tmp_path):
    """In the training process or in a loader worker alike: one line, no torch worker report."""
    kind, damage, named, lost = BAD_DATA[case]
    loader = LOADERS[kind]
    root = copy_shards(
        request.getfixturevalue("local_shards" if kind == "text" else "local_images"), tmp_path / "shards"
    )
    damage(tmp_path / "shards")
    with pytest.raises(UserError, match=named) as raised:
        take(iter(loader(config(root, shuffle_buffer=1, num_workers=workers), batch=1)), 32)
    assert "\n" not in str(raised.value) and "DataLoader worker" not in str(raised.value)

    skipping = loader(config(root, shuffle_buffer=1, on_error="skip", num_workers=workers), batch=1)
    take(iter(skipping), 32 - (lost or 4))  # what one epoch holds besides the bad samples
    skipped = skipping.skipped_samples()
    assert skipped == lost if lost else skipped >= 1
    assert skipping.state_dict()["positions"]["0"][0]["epoch"] == 0


def test_a_shard_with_more_samples_than_its_index_lists_is_refused(local_shards, tmp_path):
    root = copy_shards(local_shards, tmp_path / "shards")
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    index["shards"][2]["samples"] = 3
    (tmp_path / "shards" / "index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=r"shard-000002.tar \(it holds 4 samples, its index.json lists 3"):
        take(iter(loader(config(root, shuffle_buffer=1), batch=1)), 32)


@pytest.mark.parametrize("credentials", [True, False])
def test_an_unreachable_store_or_no_credentials_is_one_line(credentials, monkeypatch):
    """botocore's EndpointConnectionError and NoCredentialsError are not OSErrors: they too are
    one line naming the index and what to check, not a traceback."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    options = {
        "endpoint_url": f"http://127.0.0.1:{free_port()}",  # nothing listens there
        "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}},
        **({"key": "k", "secret": "s"} if credentials else {}),
    }
    error = "EndpointConnectionError" if credentials else "NoCredentialsError"
    with pytest.raises(UserError, match=rf"cannot read s3://nowhere/set/index.json \({error}: .*\): check the URL"):
        read_index(["s3://nowhere/set/shard-000000.tar"], options, ("token-blocks",), "hint")


# --------------------------------------------------------------------------- retries


class FlakyFileSystem(LocalFileSystem):
    """Local files whose every shard fails its first `failures` opens with a connection error."""

    protocol = "flaky"
    failures = 2
    opened: dict[str, int] = {}

    def _open(self, path, mode="rb", **kwargs):
        count = self.opened[path] = self.opened.get(path, 0) + 1
        if path.endswith(".tar") and count <= self.failures:
            raise ConnectionResetError(f"simulated reset #{count}")
        return super()._open(path, mode, **kwargs)


def test_transient_read_errors_are_retried_with_backoff(local_shards):
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    FlakyFileSystem.opened.clear()
    flaky_root = "flaky://" + local_shards
    # index.json is read once, unflaky; every shard's first two opens fail, the third works.
    expected = take(iter(loader(config(local_shards, shuffle_buffer=1), batch=1)), 32)
    got = take(iter(loader(config(flaky_root, shuffle_buffer=1, retries=2), batch=1)), 32)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    for on_error in ("raise", "skip"):  # a store that does not answer is never skipped: that would lose data
        FlakyFileSystem.opened.clear()
        with pytest.raises(UserError, match=r"the store did not answer \(ConnectionResetError after 1 retries"):
            take(iter(loader(config(flaky_root, shuffle_buffer=1, retries=1, on_error=on_error), batch=1)), 4)


# --------------------------------------------------------------------------- configuration


def test_shard_set_problems_are_named_before_reading(local_shards, tmp_path):
    root = copy_shards(local_shards, tmp_path / "shards")
    with pytest.raises(UserError, match=r"block_len=9 tokens but model\.seq_len=32"):
        build_text_loader(
            config(root), seq_len=32, vocab_size=50304, batch_size=1, rank=0, world_size=1, local_rank=0, seed=0
        )
    with pytest.raises(UserError, match=r"50257-token vocabulary but model\.vocab_size=1000"):
        build_text_loader(
            config(root), seq_len=SEQ_LEN, vocab_size=1000, batch_size=1, rank=0, world_size=1, local_rank=0, seed=0
        )
    with pytest.raises(UserError, match="shard-999999.tar is not listed"):
        loader(DataConfig(source="shards", urls=f"{root}/shard-{{000000,999999}}.tar"))
    with pytest.raises(UserError, match="gives no shard URL"):
        loader(DataConfig(source="shards", urls=[]))
    (tmp_path / "shards" / "index.json").write_text('{"format": "images"}')
    with pytest.raises(UserError, match="not a token-blocks index"):
        loader(config(root))
    (tmp_path / "shards" / "index.json").unlink()
    with pytest.raises(UserError, match=r"index\.json not found.*tools/prepare_text\.py"):
        loader(config(root))


def test_data_source_settings_are_checked(local_shards):
    for urls in ("???", None):  # the schema's "required" marker, or an explicit null
        with pytest.raises(UserError, match="data.urls is required when data.source=shards"):
            loader(DataConfig(source="shards", urls=urls))
    with pytest.raises(UserError, match="data.source='wiki'.*stdlib, shards"):
        loader(DataConfig(source="wiki"))
    with pytest.raises(UserError, match="data.on_error='ignore'"):
        loader(config(local_shards, on_error="ignore"))


def test_embedded_stdlib_corpus_streams(tmp_path):
    cfg = DataConfig(source="stdlib", cache_dir=str(tmp_path), stdlib_max_mb=0.1, samples_per_shard=64, num_workers=0)
    batch = next(
        iter(
            build_text_loader(
                cfg, seq_len=16, vocab_size=50304, batch_size=4, rank=1, world_size=2, local_rank=0, seed=3
            )
        )
    )
    assert batch["input_ids"].shape == (4, 16) and batch["input_ids"].dtype == torch.int64
    assert (batch["labels"][:, :-1] == batch["input_ids"][:, 1:]).all()


def test_embedded_digits_stream_with_train_and_eval_transforms(tmp_path):
    cfg = load_config(["data=digits", f"data.cache_dir={tmp_path}", "data.num_workers=0"]).data
    assert cfg.source == "digits" and cfg.image.flip_p == 0.5
    train = next(
        iter(
            build_image_loader(cfg, image_size=16, batch_size=8, rank=1, world_size=2, local_rank=0, seed=3, train=True)
        )
    )
    assert train["images"].shape == (8, 3, 16, 16) and train["images"].dtype == torch.float32
    assert train["labels"].shape == (8,) and 0 <= train["labels"].min() and train["labels"].max() <= 9
    first, again = (
        next(
            iter(
                build_image_loader(
                    cfg, image_size=16, batch_size=8, rank=0, world_size=1, local_rank=0, seed=3, train=False
                )
            )
        )
        for _ in range(2)
    )
    assert torch.equal(first["images"], again["images"])  # eval: no randomness
    with pytest.raises(UserError, match="data.source='stdlib' is not one of digits, shards"):
        build_image_loader(
            DataConfig(source="stdlib"),
            image_size=16,
            batch_size=1,
            rank=0,
            world_size=1,
            local_rank=0,
            seed=0,
            train=True,
        )


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_evaluation_reads_the_validation_split_once_over_the_ranks(workers, tmp_path):
    """One finite pass: the digits' 299 held-out images, each exactly once over 2 ranks (with 2
    workers asked for, the val split's 3 shards cap the loader at 1 per rank), in the same order
    every time."""
    cfg = load_config(["data=digits", f"data.cache_dir={tmp_path}", f"data.num_workers={workers}"]).data
    seen = []
    for rank in (0, 1):
        loader = build_image_loader(
            cfg, image_size=8, batch_size=16, rank=rank, world_size=2, local_rank=rank, seed=3, train=False
        )
        batches = list(loader)
        assert [len(b["labels"]) for b in batches] == [len(b["labels"]) for b in loader]  # finite, repeatable
        seen += [
            (tuple(image.flatten().tolist()), label)
            for b in batches
            for image, label in zip(b["images"], b["labels"].tolist(), strict=True)
        ]
    val = digits_samples("val").items
    assert len(seen) == len(val) == 299
    assert sorted(label for _, label in seen) == sorted(label for _, label in val)
    with pytest.raises(UserError, match="data.val_urls is required when data.source=shards"):
        build_image_loader(
            load_config(["data=image_shards", "data.urls=/x/shard-000000.tar"]).data,
            image_size=8,
            batch_size=1,
            rank=0,
            world_size=1,
            local_rank=0,
            seed=0,
            train=False,
        )
