"""Weighted mixtures of shard sets (data.sources): draws in proportion to the weights, fixed by
the seed; exact resume and resharding; local and S3 sources together; shard sets spread over
several directories; per-source tokens in MLflow and the log line."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from helpers import TINY, check, launch, metric_history

from pretrain.config import DataConfig, SourceConfig, load_config, redacted, source_names
from pretrain.data.build import build_image_loader, build_text_loader
from pretrain.data.loader import ShardLoader
from pretrain.data.shards import draw_sources, merge_states, mixture_probabilities
from pretrain.errors import UserError
from pretrain.prepare.embedded import digits_samples
from pretrain.prepare.images import prepare_image_shards
from pretrain.prepare.text import write_token_shards

SEQ_LEN, BLOCKS_PER_SHARD, N_SHARDS, SEED = 8, 4, 8, 5
WEIGHTS = {"web": 0.5, "code": 0.3, "books": 0.2}


def prepare(output: str, tag: str, storage_options: dict | None = None, block_len: int = SEQ_LEN + 1) -> str:
    """N_SHARDS shards of BLOCKS_PER_SHARD blocks whose words name `tag`, so no two sources share a block."""
    documents = [" ".join(f"{tag}{i}w{j}" for j in range(i % 5 + 2)) for i in range(5 * block_len)]
    index = write_token_shards(documents, output, block_len, BLOCKS_PER_SHARD, storage_options=storage_options)
    assert len(index["shards"]) >= N_SHARDS
    return output


def pattern(root: str) -> str:
    return f"{root}/shard-{{000000..{N_SHARDS - 1:06d}}}.tar"


def blocks_of(root: str) -> set[tuple]:
    """Every block of a local shard set, as the loader's input ids."""
    blocks = set()
    for n in range(N_SHARDS):
        with tarfile.open(f"{root}/shard-{n:06d}.tar") as tar:
            for member in tar.getmembers():
                blocks.add(tuple(np.load(io.BytesIO(tar.extractfile(member).read()))[:-1].tolist()))
    return blocks


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, str]:
    return {name: prepare(str(tmp_path_factory.mktemp(name)), name) for name in WEIGHTS}


@pytest.fixture(scope="module")
def owner(roots) -> dict[tuple, str]:
    """Block -> the source holding it."""
    found = {block: name for name, root in roots.items() for block in blocks_of(root)}
    assert len(found) == len(WEIGHTS) * N_SHARDS * BLOCKS_PER_SHARD  # distinct blocks: a block names its source
    return found


def mixture(roots: dict[str, str], weights: dict[str, float] = WEIGHTS, **overrides) -> DataConfig:
    sources = [SourceConfig(name=name, urls=pattern(roots[name]), weight=w) for name, w in weights.items()]
    return DataConfig(
        source="shards", urls=None, sources=sources, **{"num_workers": 0, "shuffle_buffer": 3, **overrides}
    )


def loader(cfg: DataConfig, rank: int = 0, world: int = 1, seed: int = SEED) -> ShardLoader:
    return build_text_loader(
        cfg, seq_len=SEQ_LEN, vocab_size=50304, batch_size=1, rank=rank, world_size=world, local_rank=rank, seed=seed
    )


def take(batches, n: int) -> list[tuple]:
    return [tuple(next(batches)["input_ids"][0].tolist()) for _ in range(n)]


def run_steps(cfg: DataConfig, layout: tuple[int, int], steps: int, state: dict | None, micro_batches: int = 4):
    """`steps` steps of `micro_batches` single-sample micro-batches over (ranks, workers): each
    step's samples, sorted, every rank's data state joined, and the last rank's per-source count."""
    ranks, workers = layout
    per_step: list[list[tuple]] = [[] for _ in range(steps)]
    states = []
    for rank in range(ranks):
        rank_loader = loader(DataConfig(**{**vars(cfg), "num_workers": workers}), rank=rank, world=ranks)
        if state is not None:
            rank_loader.load_state_dict(state)
        batches = iter(rank_loader)
        for step in range(steps):
            per_step[step] += take(batches, micro_batches // ranks)
        states.append(json.loads(json.dumps(rank_loader.state_dict())))  # as checkpoints store them
    return [sorted(samples) for samples in per_step], merge_states(states), rank_loader.source_samples()


def test_a_mixture_resumes_exactly_on_the_same_and_on_other_layouts(roots, owner):
    """4 lanes: 2 ranks x 2 workers for 2 steps, again for 2, then 1 rank in-process for 2, then 4
    ranks x 1 worker for 2 take the micro-batches of an unbroken 2 x 2 run, step by step, and
    count each source's samples as the draws say, however the run was cut."""
    cfg = mixture(roots, readers=4)
    expected, _, counted = run_steps(cfg, (2, 2), 8, None)
    state, got = None, []
    for layout in [(2, 2), (2, 2), (1, 0), (4, 1)]:
        steps, state, resumed_count = run_steps(cfg, layout, 2, state)
        got += steps
    assert got == expected
    seen = [owner[sample] for step in expected for sample in step]
    assert {name: seen.count(name) for name in WEIGHTS} == counted == resumed_count
    drawn = draw_sources(SEED, mixture_probabilities(list(WEIGHTS.values())), np.arange(32))
    assert [counted[name] for name in WEIGHTS] == np.bincount(drawn, minlength=3).tolist()
    assert len(set(seen)) == 3  # 32 micro-batches hold all three sources


def test_observed_shares_match_the_weights(roots, owner):
    """600 micro-batches: each source's share within 4 standard deviations of binomial noise
    (0.5: +-0.082, 0.2: +-0.065) of its weight, and exactly the count the draws give; the draws
    alone, over 200,000 micro-batches, within 0.005."""
    n = 600
    seen = [owner[sample] for sample in take(iter(loader(mixture(roots))), n)]
    probabilities = mixture_probabilities(list(WEIGHTS.values()))
    for name, p in zip(WEIGHTS, probabilities, strict=True):
        assert abs(seen.count(name) / n - p) < 4 * math.sqrt(p * (1 - p) / n), name
    drawn = draw_sources(SEED, probabilities, np.arange(n))
    assert [seen.count(name) for name in WEIGHTS] == np.bincount(drawn, minlength=3).tolist()
    many = np.bincount(draw_sources(SEED, probabilities, np.arange(200_000)), minlength=3) / 200_000
    assert np.abs(many - probabilities).max() < 0.005


def test_the_seed_fixes_the_sequence_and_another_seed_gives_another(roots):
    cfg = mixture(roots)
    first, again, other = (take(iter(loader(cfg, seed=seed)), 40) for seed in (SEED, SEED, SEED + 1))
    assert first == again and first != other
    draws = [draw_sources(seed, [0.5, 0.5], np.arange(64)).tolist() for seed in (SEED, SEED + 1)]
    assert draws[0] != draws[1]


def test_one_source_is_the_plain_shard_set(roots):
    """A mixture of one source reads exactly what data.urls with the same shards reads."""
    plain = DataConfig(source="shards", urls=pattern(roots["web"]), num_workers=0, shuffle_buffer=3)
    assert take(iter(loader(mixture(roots, {"web": 0.7}))), 40) == take(iter(loader(plain)), 40)


def test_local_and_s3_sources_mix_and_resume(roots, owner, s3):
    """A local source (no storage options) and one on S3 with its own (a copy of "code"): both are
    read, and a resumed loader continues the sequence."""
    remote = s3.url("mixture/code")
    fsspec.filesystem("s3", **s3.storage_options).put(f"{roots['code']}/", f"{remote}/", recursive=True)
    sources = [
        SourceConfig(name="web", urls=pattern(roots["web"]), weight=1.0),
        SourceConfig(name="code", urls=pattern(remote), weight=1.0, storage_options=s3.storage_options),
    ]
    cfg = DataConfig(source="shards", urls=None, sources=sources, num_workers=0, shuffle_buffer=3)
    first = loader(cfg)
    batches = iter(first)
    head = take(batches, 6)
    state = json.loads(json.dumps(first.state_dict()))
    tail = take(batches, 6)
    resumed = loader(cfg)
    resumed.load_state_dict(state)
    assert take(iter(resumed), 6) == tail
    seen = [owner[s] for s in head + tail]
    assert first.source_samples() == {"web": seen.count("web"), "code": seen.count("code")}
    assert 0 < seen.count("code") < 12


def test_a_shard_set_may_span_directories_whose_indexes_agree(roots, owner, tmp_path):
    """data.urls over two directories reads both; an index that disagrees on block_len or on the
    tokenizer is one line naming both index.json files and the field."""
    two = [pattern(roots["web"]), pattern(roots["code"])]
    seen = take(iter(loader(DataConfig(source="shards", urls=two, num_workers=0))), 64)
    assert {owner[s] for s in seen} == {"web", "code"} and len(set(seen)) == 64  # one epoch of both
    longer = prepare(str(tmp_path / "longer"), "long", block_len=SEQ_LEN + 9)
    with pytest.raises(
        UserError, match=rf"{roots['web']}/index.json and {longer}/index.json disagree on block_len \(9 vs 17\)"
    ):
        loader(DataConfig(source="shards", urls=[pattern(roots["web"]), pattern(longer)], num_workers=0))
    index = json.loads(Path(roots["code"], "index.json").read_text())
    other = tmp_path / "other-tokenizer"
    other.mkdir()
    for n in range(N_SHARDS):
        (other / f"shard-{n:06d}.tar").write_bytes(Path(roots["code"], f"shard-{n:06d}.tar").read_bytes())
    both = mixture({"web": roots["web"], "code": str(other)}, {"web": 1, "code": 1})
    # Another name for the same files is the same tokenizer; other files are not.
    (other / "index.json").write_text(json.dumps({**index, "tokenizer": {**index["tokenizer"], "name": "renamed"}}))
    assert len(take(iter(loader(both)), 4)) == 4
    (other / "index.json").write_text(json.dumps({**index, "tokenizer": {**index["tokenizer"], "sha256": "0" * 64}}))
    with pytest.raises(UserError, match=rf"{other}/index.json was made by tokenizer 'gpt2' .* but \S+ by ") as raised:
        loader(both)
    assert "\n" not in str(raised.value)


def test_mixture_settings_are_checked_naming_the_field(roots):
    def sources(*items: SourceConfig, urls: str | None = None) -> DataConfig:
        return DataConfig(source="shards", urls=urls, sources=list(items))

    web = SourceConfig(urls="/d/web/shard-0.tar", weight=1.0)
    assert source_names(sources(web, SourceConfig(name="w2", urls=["/e/web/s.tar"], weight=2))) == ["web", "w2"]
    cases = {
        r"data.sources\[0\].weight=-1 must be a finite number > 0": sources(SourceConfig(urls="/d/x.tar", weight=-1)),
        r"data.sources\[0\].weight=nan must be": sources(SourceConfig(urls="/d/x.tar", weight=math.nan)),
        "data.sources is an empty list": sources(),
        r"data.sources\[1\] and data.sources\[0\] are both named 'web' \(from their directories\)": sources(web, web),
        r"data.sources\[0\].name='a:b' names the metric": sources(SourceConfig(name="a:b", urls="/d/x.tar", weight=1)),
        "data.urls and data.sources are both set": sources(web, urls="/d/x.tar"),
        r"data.sources\[0\].urls is required": sources(SourceConfig(weight=1.0)),
    }
    for error, cfg in cases.items():
        with pytest.raises(UserError, match=error):
            source_names(cfg)
    with pytest.raises(UserError, match=r"config key 'data.sources\[0\].weight' is required"):
        load_config(["data=shards", 'data.sources=[{urls: "/d/web/shard-0.tar"}]'])
    with pytest.raises(UserError, match="config key 'data.urls' is required"):
        load_config(["data=shards"])
    with pytest.raises(UserError, match=r"data.sources\[0\].urls=\[\] gives no shard URL"):
        loader(sources(SourceConfig(urls=[], weight=1.0)))
    with pytest.raises(UserError, match=r"data.sources\[0\].urls gives 8 shards for data.readers=16"):
        loader(mixture(roots, {"web": 1, "code": 1}, readers=16, num_workers=0))
    first = loader(mixture(roots, {"web": 1, "code": 1}))
    next(iter(first))
    with pytest.raises(UserError, match=r"sources \[.*'share': 0.5.*\] -> \[.*'share': 0.75"):
        loader(mixture(roots, {"web": 3, "code": 1})).load_state_dict(first.state_dict())


def test_credentials_of_every_source_are_masked(roots):
    cfg = load_config(
        [
            "data=shards",
            '+data.sources=[{urls: "s3://b/d/s.tar", weight: 1, storage_options: '
            '{key: AKIA, secret: hush, endpoint_url: "http://h"}}]',
        ]
    )
    options = redacted(cfg)["data"]["sources"][0]["storage_options"]
    assert options == {"key": "***", "secret": "***", "endpoint_url": "http://h"}


@pytest.mark.slow  # 1.3 s: image encoding
def test_images_mix_too(tmp_path):
    """Image shard sets go through the same stream: two sets of digits with the same classes mix."""
    digits = digits_samples()
    roots = []
    for n in range(2):
        part = dataclasses.replace(digits, items=digits.items[8 * n : 8 * n + 8])
        roots.append(str(tmp_path / f"digits{n}"))
        prepare_image_shards(part, roots[-1], 2)
    cfg = DataConfig(
        source="shards",
        urls=None,
        sources=[SourceConfig(urls=f"{root}/shard-{{000000..000003}}.tar", weight=1.0) for root in roots],
        num_workers=0,
    )
    images = build_image_loader(cfg, image_size=8, batch_size=2, rank=0, world_size=1, local_rank=0, seed=1, train=True)
    batches = iter(images)
    assert [next(batches)["images"].shape for _ in range(4)] == [torch.Size([2, 3, 8, 8])] * 4
    drawn = np.bincount(draw_sources(1, [0.5, 0.5], np.arange(4)), minlength=2) * 2
    assert images.source_samples() == {"digits0": drawn[0], "digits1": drawn[1]}


@pytest.mark.slow
def test_a_two_source_mixture_trains_resumes_and_logs_tokens_per_source(tmp_path):
    """One rank, 4 micro-batches of 2 blocks a step: 4 steps, then a resume to 6; tokens_seen/<name>
    at every logged step is what the draws of the run's micro-batches give, and adds up to tokens_seen."""
    roots = {name: prepare(str(tmp_path / name), name, block_len=33) for name in ("web", "code")}
    weights = {"web": 3, "code": 1}
    sources = ", ".join(f'{{name: {n}, urls: "{pattern(roots[n])}", weight: {w}}}' for n, w in weights.items())
    args = [
        "+exp=tost_gpt2_smoke",
        *TINY,
        "data=shards",
        f"data.sources=[{sources}]",
        "data.num_workers=1",
        "engine=ddp",
        "engine.precision=fp32",
        "checkpoint.interval=2",
        f"run_dir={tmp_path / 'run'}",
    ]
    check(launch("python", [*args, "train.max_steps=4"]))
    resumed = check(launch("python", [*args, "train.max_steps=6"]))
    assert "resumed from" in resumed.stdout + resumed.stderr
    drawn = draw_sources(1337, [0.75, 0.25], np.arange(6 * 4))  # train.seed's draws, 4 micro-batches a step
    for name, i in (("web", 0), ("code", 1)):
        logged = metric_history(tmp_path / "run", f"tokens_seen/{name}")
        assert logged == {step: float((drawn[: 4 * step] == i).sum() * 2 * 32) for step in range(1, 7)}, name
    total = metric_history(tmp_path / "run", "tokens_seen")
    web, code = (metric_history(tmp_path / "run", f"tokens_seen/{n}") for n in ("web", "code"))
    assert all(web[s] + code[s] == total[s] for s in total)
    line = next(line for line in (resumed.stdout + resumed.stderr).splitlines() if "step 6/6" in line)
    assert f"| web {web[6] / 1e3:.3g}k tok | code {code[6]:.0f} tok" in line  # 1536 tokens in all
