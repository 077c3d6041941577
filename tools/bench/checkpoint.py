"""Benchmark checkpoints: save and load MB/s for a ToST-Base-sized state, and how much of a
training loop async saves block.

    python tools/bench/checkpoint.py --write-doc docs/benchmarks.md

The state is ToST-Base's (`+exp=tost_gpt2`) fp32 weights and AdamW moments after one step,
written with torch.save as an engine would, then uploaded, hashed and committed by the
CheckpointStore; loading downloads (or reads in place), checks every sha256 and torch.loads. The
stores are local disk and moto's S3 server on 127.0.0.1 (its own process). The blocked fraction
runs a stand-in training loop (fixed matmul work per step) in a one-rank process group, saving
the same state every few steps through the CheckpointManager, with async_upload on and off.
One JSON object goes to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

import torch
from common import TOST_BASE, LocalS3, add_write_doc_flag, device_name, heading, publish

from pretrain.checkpoint.manager import CheckpointManager, SavePolicy
from pretrain.checkpoint.store import CheckpointStore, Node
from pretrain.config import load_config
from pretrain.launch import run_local_world
from pretrain.models import build_model

ONE_NODE = Node(index=0, count=1, is_leader=True)
MB = 2**20
LOOP_MATMUL = 1024  # the stand-in step multiplies two square fp32 matrices of this size


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="stand-in training steps per blocked-fraction run")
    p.add_argument("--interval", type=int, default=10, help="save every N stand-in steps")
    p.add_argument("--matmuls", type=int, default=40, help="matmuls per stand-in step (sets its length)")
    add_write_doc_flag(p)
    return p.parse_args(argv)


class StateWriter:
    """ToST-Base's weights and AdamW state, written as an engine writes its files."""

    def __init__(self) -> None:
        model = build_model(load_config(TOST_BASE).model)
        optimizer = torch.optim.AdamW(model.parameters())
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()  # creates the moments
        self.state = {"model": model.state_dict(), "optim": optimizer.state_dict()}

    def save(self, step_dir: str) -> None:
        for name, part in self.state.items():
            torch.save(part, os.path.join(step_dir, f"{name}.pt"))


def staged_bytes(directory: str) -> int:
    return sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())


def save_and_load(writer: StateWriter, store: CheckpointStore, step: int) -> dict:
    staged = store.staging_dir(step)
    os.makedirs(staged, exist_ok=True)
    start = time.perf_counter()
    writer.save(staged)
    size = staged_bytes(staged)
    written = time.perf_counter()
    store.upload(step, "bench")
    store.commit(step, "bench", {"world_size": 1}, wait_s=60)
    committed = time.perf_counter()
    directory = store.fetch(step)
    fetched = time.perf_counter()
    for name in writer.state:
        torch.load(os.path.join(directory, f"{name}.pt"), weights_only=False)
    loaded = time.perf_counter()
    return {
        "bytes": size,
        "write_s": written - start,
        "upload_commit_s": committed - written,
        "save_mb_per_s": size / MB / (committed - start),
        "fetch_verify_s": fetched - committed,
        "load_mb_per_s": size / MB / (loaded - committed),
    }


def blocked_fraction(
    dist_info, url: str, options: dict, staging: str, steps: int, interval: int, matmuls: int, async_upload: bool
) -> dict:
    """A stand-in training loop with saves; the share of its wall time that saves blocked."""
    writer = StateWriter()
    store = CheckpointStore(url, options, staging, ONE_NODE)
    manager = CheckpointManager(store, dist_info, SavePolicy(2, 0, 600.0, async_upload, "fail"))
    a = torch.randn(LOOP_MATMUL, LOOP_MATMUL)
    blocked = 0.0
    start = time.perf_counter()
    for step in range(1, steps + 1):
        for _ in range(matmuls):
            a = torch.tanh(a @ a.T / LOOP_MATMUL)
        if step % interval == 0:
            blocked += manager.save(step, writer, {}, {"engine": "bench"})
    wait_start = time.perf_counter()
    manager.wait()
    blocked += time.perf_counter() - wait_start  # the end of a run waits for the last upload
    wall = time.perf_counter() - start
    return {
        "async_upload": async_upload,
        "wall_s": wall,
        "blocked_s": blocked,
        "blocked_fraction": blocked / wall,
        "saves": steps // interval,
        "save_s": manager.committed_save_seconds(),
    }


def markdown(report: dict, command: str) -> tuple[str, str]:
    rows = [
        f"| {r['store']} | {r['bytes'] / MB:,.0f} | {r['save_mb_per_s']:,.0f} | {r['load_mb_per_s']:,.0f} |"
        for r in report["throughput"]
    ]
    loops = [
        f"| {r['store']} | {'async' if r['async_upload'] else 'sync'} | {r['saves']} | {r['wall_s']:.1f} | "
        f"{r['blocked_s']:.1f} | {r['blocked_fraction']:.1%} |"
        for r in report["blocked"]
    ]
    text = "\n".join(
        [
            heading("Checkpoints", report["device"]),
            "",
            f"`{command}`",
            "",
            "Save = torch.save of ToST-Base's fp32 weights and AdamW moments into staging, upload with sha256, "
            "manifest; load = download (S3) or read in place (local), check every sha256, torch.load. `s3` is moto's "
            "server on 127.0.0.1 in its own process, on the same 2 cores.",
            "",
            "| store | MB | save MB/s | load MB/s |",
            "|---|---:|---:|---:|",
            *rows,
            "",
            f"Blocked fraction: a stand-in training loop ({report['loop']['steps']} steps of "
            f"{report['loop']['matmuls']} {LOOP_MATMUL}x{LOOP_MATMUL} matmuls) saving that state every "
            f"{report['loop']['interval']} steps through the CheckpointManager; blocked = time inside save() plus the "
            "final wait for the last upload.",
            "",
            "| store | upload | saves | wall s | blocked s | blocked |",
            "|---|---|---:|---:|---:|---:|",
            *loops,
        ]
    )
    return f"checkpoint | {report['device']}", text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = {
        "device": device_name(),
        "torch": torch.__version__,
        "throughput": [],
        "blocked": [],
        "loop": {"steps": args.steps, "interval": args.interval, "matmuls": args.matmuls},
    }
    print("building the ToST-Base state", file=sys.stderr)
    writer = StateWriter()
    server = LocalS3()
    with tempfile.TemporaryDirectory() as tmp, closing(server):
        stores = {"local": (f"{tmp}/ckpt", {}), "s3": ("s3://bench/ckpt", server.options)}
        for name, (url, options) in stores.items():
            store = CheckpointStore(url, options, f"{tmp}/staging-{name}", ONE_NODE)
            result = {"store": name, **save_and_load(writer, store, 1)}
            report["throughput"].append(result)
            print(
                f"{name}: save {result['save_mb_per_s']:,.0f} MB/s, load {result['load_mb_per_s']:,.0f} MB/s",
                file=sys.stderr,
            )
            for async_upload in (False, True):
                (loop,) = run_local_world(
                    blocked_fraction,
                    1,
                    f"{url}-loop-{async_upload}",
                    options,
                    f"{tmp}/staging-loop-{name}",
                    args.steps,
                    args.interval,
                    args.matmuls,
                    async_upload,
                )
                report["blocked"].append({"store": name, **loop})
                print(
                    f"{name} {'async' if async_upload else 'sync'}: blocked {loop['blocked_fraction']:.1%} "
                    f"of {loop['wall_s']:.1f} s",
                    file=sys.stderr,
                )
    publish(report, args.write_doc, lambda command: markdown(report, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
