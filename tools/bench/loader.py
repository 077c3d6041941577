"""Benchmark the data loader: tokens/s and images/s that one loader worker delivers.

    python tools/bench/loader.py --write-doc docs/benchmarks.md
    python tools/bench/loader.py --workers 1 2 --seconds 20
    python tools/bench/loader.py --cases mixture --write-doc docs/benchmarks.md

Text: token blocks of ToST-Base's length (1024 + 1) from the embedded stdlib corpus, in batches of
`+exp=tost_gpt2`'s micro-batch. Images: JPEGs of ImageNet's typical size (500 x 375), cut from
the two photos scikit-learn ships, through the training augmentation (random-resized crop to
224 px, flip, normalisation). Each is read from local disk and from moto's S3 server on 127.0.0.1
through s3fs, by the same ShardLoader training uses (a DataLoader whose workers are each a
process), and timed by wall clock in the training process over whole batches after a warmup.
Mixture: the same text shards as one source, and split into three local shard sets mixed with
weights 0.5/0.3/0.2 (data.sources), read by one worker with the same settings: what drawing each
micro-batch's source and keeping a reader per source costs.

The text target compares one worker with the most a GPU could consume: the H100's dense bf16
peak divided by ToST-Base's training FLOPs per token, i.e. ToST-Base at 100% MFU. One JSON object
goes to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import shutil
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

import fsspec
import numpy as np
import torch
from common import TOST_BASE, LocalS3, add_write_doc_flag, device_name, heading, publish, upload
from PIL import Image
from sklearn.datasets import load_sample_images

from pretrain.config import DataConfig, SourceConfig, load_config
from pretrain.data.build import build_image_loader, build_text_loader
from pretrain.data.images import IMAGE_SIZE
from pretrain.data.loader import ShardLoader
from pretrain.models import build_model
from pretrain.prepare.embedded import prepare_stdlib_corpus
from pretrain.prepare.images import JPEG_QUALITY, Encoded, ImageSource, prepare_image_shards
from pretrain.tracking.metrics import PEAK_BF16_FLOPS

TEXT_CORPUS_MB = 16
TEXT_SHARD_BLOCKS = 1024  # 2 MiB shards
PHOTO_SIZE = (500, 375)  # ImageNet's most common training image size
PHOTOS = 256
PHOTOS_PER_SHARD = 32
IMAGE_BATCH = 64
SHUFFLE_BUFFER = 1000
WARMUP_BATCHES = 3
TARGET_FACTOR = 10
TARGET_GPU = "H100"
SEED = 0
MIXTURE = (0.5, 0.3, 0.2)
CASES = ("sources", "mixture")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[1], help="loader worker counts to time (default: 1)")
    p.add_argument("--seconds", type=float, default=10.0, help="timed seconds per case, after warmup (default: 10)")
    p.add_argument(
        "--cache-dir",
        default="~/.cache/whitebox-pretrain",
        help="where the stdlib corpus shards are built once and kept (default: data.cache_dir's)",
    )
    p.add_argument(
        "--cases",
        nargs="+",
        choices=CASES,
        default=list(CASES),
        help="sources: text and images from file and S3; mixture: 3 text sources against 1 (default: both)",
    )
    add_write_doc_flag(p)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- inputs


def photo_samples(n: int) -> list[tuple[bytes, str, int]]:
    """`n` distinct 500 x 375 JPEGs: seeded crops of scikit-learn's sample photos, some flipped."""
    rng = np.random.default_rng(SEED)
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    samples = []
    for i in range(n):
        photo = photos[i % len(photos)]
        scale = rng.uniform(0.6, 1.0)
        w, h = int(photo.width * scale), int(photo.height * scale)
        left, top = rng.integers(0, photo.width - w + 1), rng.integers(0, photo.height - h + 1)
        image = photo.resize(PHOTO_SIZE, Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=JPEG_QUALITY)
        samples.append((buf.getvalue(), "jpg", i % len(photos)))
    return samples


def shard_urls(root: str, storage_options: dict) -> list[str]:
    with fsspec.open(f"{root}/index.json", "r", **storage_options) as f:
        return [f"{root}/{s['name']}" for s in json.load(f)["shards"]]


# --------------------------------------------------------------------------- timing


def time_loader(loader: ShardLoader, seconds: float) -> dict:
    """Samples/s over whole batches after WARMUP_BATCHES untimed ones (worker start-up, first
    shard opens); `wall_s` spans the warmup too."""
    started = time.perf_counter()
    batches = iter(loader)
    for _ in range(WARMUP_BATCHES):
        next(batches)
    samples = n_batches = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        batch = next(batches)
        samples += len(batch["labels"])
        n_batches += 1
    return {"samples_per_s": samples / elapsed, "batches": n_batches, "wall_s": time.perf_counter() - started}


def data_config(urls: list[str], storage_options: dict, workers: int) -> DataConfig:
    return DataConfig(
        source="shards", urls=urls, storage_options=storage_options, num_workers=workers, shuffle_buffer=SHUFFLE_BUFFER
    )


def split_shard_set(root: str, into: str, parts: int) -> list[list[str]]:
    """`root`'s shards dealt round-robin into `parts` shard sets under `into`, each with its own
    index.json: the same data as `parts` sources. Their URLs, per set."""
    index = json.loads(Path(root, "index.json").read_text())
    sets = []
    for part in range(parts):
        directory = Path(into, f"source{part}")
        directory.mkdir(parents=True)
        shards = index["shards"][part::parts]
        for shard in shards:
            shutil.copyfile(Path(root, shard["name"]), directory / shard["name"])
        (directory / "index.json").write_text(json.dumps({**index, "shards": shards}))
        sets.append([str(directory / shard["name"]) for shard in shards])
    return sets


def bench_mixture(root: str, tmp: str, seq_len: int, batch: int, seconds: float) -> list[dict]:
    """One worker over the text shards as one source, then as three weighted sources."""
    sets = split_shard_set(root, f"{tmp}/mixture", len(MIXTURE))
    mixed = dataclasses.replace(
        data_config([], {}, 1),
        urls=None,
        sources=[SourceConfig(urls=urls, weight=w) for urls, w in zip(sets, MIXTURE, strict=True)],
    )
    results = []
    for sources, cfg in ((1, data_config(sorted(u for s in sets for u in s), {}, 1)), (len(MIXTURE), mixed)):
        result = bench_text(cfg, seq_len, batch, seconds)
        result.pop("wall_s")
        results.append({"sources": sources, "shards": sum(map(len, sets)), "batch": batch, **result})
        print(f"text, {sources} source(s), 1 worker: {result['tokens_per_s']:,.0f} tokens/s", file=sys.stderr)
    return results


def bench_text(cfg: DataConfig, seq_len: int, batch: int, seconds: float) -> dict:
    loader = build_text_loader(
        cfg,
        seq_len=seq_len,
        vocab_size=50304,
        batch_size=batch,
        rank=0,
        world_size=1,
        local_rank=0,
        seed=SEED,
    )
    result = time_loader(loader, seconds)
    return {**result, "tokens_per_s": result["samples_per_s"] * seq_len}


def bench_images(urls: list[str], storage_options: dict, workers: int, seconds: float) -> dict:
    loader = build_image_loader(
        data_config(urls, storage_options, workers),
        image_size=IMAGE_SIZE,
        batch_size=IMAGE_BATCH,
        rank=0,
        world_size=1,
        local_rank=0,
        seed=SEED,
        train=True,
    )
    return time_loader(loader, seconds)


def gpu_ceiling() -> dict:
    """Tokens/s one GPU could consume training ToST-Base: its dense bf16 peak over the model's
    training FLOPs per token (100% MFU; any real run consumes less)."""
    cfg = load_config(TOST_BASE)
    with torch.device("meta"):  # the FLOP count needs shapes only
        flops_per_token = build_model(cfg.model).flops_per_token()
    peak = PEAK_BF16_FLOPS[TARGET_GPU]
    return {
        "model": "ToST-Base (tost_base)",
        "gpu": TARGET_GPU,
        "peak_bf16_flops": peak,
        "flops_per_token": flops_per_token,
        "tokens_per_s_at_100pct_mfu": peak / flops_per_token,
        "seq_len": cfg.model.seq_len,
        "micro_batch": cfg.train.micro_batch_size,
    }


# --------------------------------------------------------------------------- report


def markdown(report: dict, command: str) -> tuple[str, str]:
    ceiling, target = report["basis"], report["target_tokens_per_s"]
    rows = []
    for r in report["results"]:
        per_worker = r["samples_per_s"] / r["workers"]
        rate = (
            f"{r['tokens_per_s']:,.0f} tokens/s ({per_worker * ceiling['seq_len']:,.0f} per worker)"
            if r["kind"] == "text"
            else f"{r['samples_per_s']:,.0f} images/s ({per_worker:,.0f} per worker)"
        )
        verdict = ("yes" if r["tokens_per_s"] / r["workers"] >= target else "no") if r["kind"] == "text" else "-"
        server = "-" if r["s3_server_cores"] is None else f"{r['s3_server_cores']:.2f}"
        rows.append(f"| {r['kind']} | {r['source']} | {r['workers']} | {r['batch']} | {rate} | {server} | {verdict} |")
    text = "\n".join(
        [
            heading("Data loader", report["device"]),
            "",
            f"`{command}`",
            "",
            "What one training rank's ShardLoader delivers, timed in the training process over whole batches "
            f"after {WARMUP_BATCHES} warmup batches, {report['seconds']:.0f} s per row. "
            f"Text: {ceiling['seq_len'] + 1}-token "
            f"uint16 blocks of the stdlib corpus ({TEXT_SHARD_BLOCKS} blocks per shard), batches of "
            f"{ceiling['micro_batch']} sequences (`+exp=tost_gpt2`'s micro-batch). Images: {PHOTOS} distinct "
            f"{PHOTO_SIZE[0]} x {PHOTO_SIZE[1]} JPEGs ({PHOTOS_PER_SHARD} per shard) through the training augmentation "
            f"(random-resized crop to {IMAGE_SIZE} px, flip, normalisation), batches of {IMAGE_BATCH}. `s3` is moto's "
            "server on 127.0.0.1 through s3fs: a Python server in its own process on the same cores as the training "
            "process and the loader worker; the CPU cores it kept busy are in the table.",
            "",
            f"Target (text): one worker delivers at least {TARGET_FACTOR}x what one {ceiling['gpu']} could consume "
            f"training ToST-Base, taken at 100% MFU since no GPU was measured: "
            f"{ceiling['peak_bf16_flops']:.3g} FLOP/s / "
            f"{ceiling['flops_per_token']:.4g} FLOP per token = {ceiling['tokens_per_s_at_100pct_mfu']:,.0f} tokens/s, "
            f"so {target:,.0f} tokens/s per worker.",
            "",
            "| data | from | workers | batch | delivered | S3 server cores | text target met |",
            "|---|---|---:|---:|---:|---:|---|",
            *rows,
        ]
    )
    return f"loader | {report['device']}", text


def bench_sources(
    text_dir: str, worker_counts: list[int], seq_len: int, micro_batch: int, seconds: float
) -> list[dict]:
    """Text and images, from local files and from S3, with each worker count."""
    results = []
    server = LocalS3()
    with tempfile.TemporaryDirectory() as tmp, closing(server):
        image_dir = f"{tmp}/images"
        photos = ImageSource(["china", "flower"], photo_samples(PHOTOS), Encoded, "bench photos", "bench photos")
        prepare_image_shards(photos, image_dir, PHOTOS_PER_SHARD)
        roots = {
            ("text", "file"): text_dir,
            ("images", "file"): image_dir,
            ("text", "s3"): upload(text_dir, "text", server.options),
            ("images", "s3"): upload(image_dir, "images", server.options),
        }
        for (kind, where), root in sorted(roots.items(), key=lambda kv: (kv[0][1], kv[0][0] == "images")):
            urls = shard_urls(root, server.options if where == "s3" else {})
            options = server.options if where == "s3" else {}
            for workers in worker_counts:
                cpu_before = server.cpu_seconds()
                if kind == "text":
                    result = bench_text(data_config(urls, options, workers), seq_len, micro_batch, seconds)
                else:
                    result = bench_images(urls, options, workers, seconds)
                server_cores = (server.cpu_seconds() - cpu_before) / result.pop("wall_s") if where == "s3" else None
                result = {
                    "kind": kind,
                    "source": where,
                    "workers": workers,
                    "batch": micro_batch if kind == "text" else IMAGE_BATCH,
                    **result,
                    "s3_server_cores": server_cores,
                }
                results.append(result)
                rate = (
                    f"{result['tokens_per_s']:,.0f} tokens/s"
                    if kind == "text"
                    else f"{result['samples_per_s']:,.0f} images/s"
                )
                print(f"{kind} from {where}, {workers} worker(s): {rate}", file=sys.stderr)
    return results


def mixture_markdown(report: dict, command: str) -> tuple[str, str]:
    one, mixed = report["mixture"]
    weights = "/".join(f"{w:g}" for w in MIXTURE)
    rows = [
        f"| {r['sources']} | {r['shards']} | {r['batch']} | {r['tokens_per_s']:,.0f} | {r['batches']} |"
        for r in report["mixture"]
    ]
    text = "\n".join(
        [
            heading("Data loader, mixture of sources", report["device"]),
            "",
            f"`{command}`",
            "",
            f"One loader worker, {report['seconds']:.0f} s per row after {WARMUP_BATCHES} warmup batches: the "
            f"stdlib corpus's {one['shards']} shards of {TEXT_SHARD_BLOCKS} blocks "
            f"({report['basis']['seq_len'] + 1} tokens, uint16) as one source (data.urls), then dealt into "
            f"{mixed['sources']} local shard sets mixed with weights {weights} (data.sources); batches of "
            f"{one['batch']}, shuffle buffer {SHUFFLE_BUFFER}, the same for both. The mixture delivers "
            f"{mixed['tokens_per_s'] / one['tokens_per_s']:.2f}x the single source's tokens/s.",
            "",
            "| sources | shards | batch | tokens/s | batches timed |",
            "|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
    return f"loader mixture | {report['device']}", text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    basis = gpu_ceiling()
    seq_len, micro_batch = basis["seq_len"], basis["micro_batch"]
    report = {
        "device": device_name(),
        "torch": torch.__version__,
        "seconds": args.seconds,
        "basis": basis,
        "target_tokens_per_s": TARGET_FACTOR * basis["tokens_per_s_at_100pct_mfu"],
    }
    print("preparing text shards", file=sys.stderr)
    text_dir = prepare_stdlib_corpus(
        args.cache_dir,
        seq_len + 1,
        TEXT_SHARD_BLOCKS,
        TEXT_CORPUS_MB * 2**20,
        is_preparer=True,
        progress=sys.stderr.isatty(),
    )
    sections = []
    if "sources" in args.cases:
        report["results"] = bench_sources(text_dir, args.workers, seq_len, micro_batch, args.seconds)
        sections.append(lambda command: markdown(report, command))
    if "mixture" in args.cases:
        with tempfile.TemporaryDirectory() as tmp:
            report["mixture"] = bench_mixture(text_dir, tmp, seq_len, micro_batch, args.seconds)
        sections.append(lambda command: mixture_markdown(report, command))
    publish(report, args.write_doc, *sections)
    return 0


if __name__ == "__main__":
    sys.exit(main())
