"""Benchmark tools/convert.py's exports of a ToST-Base checkpoint: wall time, peak memory, bytes.

    python tools/bench/export.py
    python tools/bench/export.py --precision fp32 --write-doc docs/benchmarks.md
    python tools/bench/export.py --checkpoint runs/tost_gpt2/checkpoints     # an existing store

The checkpoint is made the cheapest honest way: one optimizer step of ToST-Base (`+exp=tost_gpt2`:
12 layers, 768 wide, 12 heads, 1024 tokens) under DeepSpeed ZeRO-3 on 2 CPU ranks (torchrun,
gloo), one sequence per rank of the embedded standard-library corpus, evaluated on one batch and
checkpointed at its last step, as any run is. Each export subcommand (export-safetensors, and
export-hf where this checkout has it) then runs as a subprocess, as users run it: its wall time,
its peak resident set (the child's ru_maxrss, from wait4), the checkpoint's bytes (every file its
manifest names) and the bytes it wrote. `startup_s` is what `convert.py export-safetensors --help`
takes, the interpreter and imports every export pays. One JSON object goes to stdout; progress
and the tools' own output go to stderr.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import TOST_BASE, add_write_doc_flag, device_name, heading, publish

from pretrain.checkpoint.store import MANIFEST_NAME, STEP_DIR_RE
from pretrain.distributed import free_port

REPO = Path(__file__).resolve().parents[2]
MAIN = str(REPO / "pretrain" / "main.py")
CONVERT = str(REPO / "tools" / "convert.py")
MB = 2**20
EXPORTS = ("export-safetensors", "export-hf")
# One optimizer step of ToST-Base on the embedded corpus (TOST_BASE's shard URLs replaced by it),
# 1 sequence per rank; the corpus is cut small, since one step reads 2 blocks and one evaluation 2.
BASE_RUN = [
    *(o for o in TOST_BASE if not o.startswith("data.")),
    "data=stdlib",
    "data.stdlib_max_mb=0.5",
    "data.samples_per_shard=16",
    "data.num_workers=0",
    "engine=deepspeed",
    "engine.zero_stage=3",
    "train.max_steps=1",
    "train.global_batch_size=2",
    "train.micro_batch_size=1",
    "train.log_interval=1",
    "train.eval_max_batches=1",
    "checkpoint.interval=1",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--precision",
        choices=("bf16", "fp32"),
        default="bf16",
        help="engine.precision of the training step: bf16 (the recipe's; DeepSpeed keeps fp32 master weights "
        "in the optimizer files) or fp32 (default: bf16)",
    )
    p.add_argument(
        "--checkpoint",
        metavar="STORE",
        help="export this local checkpoint store (a run's checkpoint.url) instead of training one",
    )
    p.add_argument("--repeats", type=int, default=1, help="runs of each export; the report keeps each (default: 1)")
    add_write_doc_flag(p)
    return p.parse_args(argv)


def train_checkpoint(tmp: str, precision: str) -> tuple[str, float]:
    """One ZeRO-3 step of ToST-Base on 2 ranks; its checkpoint store and the launch's wall time."""
    torchrun = [shutil.which("torchrun"), "--nnodes", "1", "--nproc_per_node", "2", "--rdzv_backend", "c10d"]
    cmd = [*torchrun, "--rdzv_endpoint", f"127.0.0.1:{free_port()}", MAIN, *BASE_RUN]
    cmd += [f"engine.precision={precision}", f"run_dir={tmp}/run", f"data.cache_dir={tmp}/corpus"]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env={**child_env(), "OMP_NUM_THREADS": "1"}, stdout=sys.stderr, check=True)
    return f"{tmp}/run/checkpoints", time.perf_counter() - start


def child_env() -> dict[str, str]:
    """The children import this checkout, whatever tree an editable install points at."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}


def newest_step(store: str) -> tuple[int, dict]:
    steps = [p for p in Path(store).iterdir() if STEP_DIR_RE.match(p.name) and (p / MANIFEST_NAME).is_file()]
    if not steps:
        raise SystemExit(f"export: error: {store} holds no committed checkpoint")
    newest = max(steps, key=lambda p: p.name)
    return int(STEP_DIR_RE.match(newest.name).group(1)), json.loads((newest / MANIFEST_NAME).read_text())


def run_child(cmd: list[str]) -> tuple[int, float, float]:
    """`cmd` as a child process (stdout and stderr to ours'): exit code, wall s, peak RSS in MiB
    (its own ru_maxrss, from wait4: earlier children, such as the training, do not count)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=sys.stderr, stderr=sys.stderr)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    return proc.returncode, wall, usage.ru_maxrss / 1024  # Linux reports KiB


def directory_bytes(directory: str) -> tuple[int, list[str]]:
    files = sorted(p for p in Path(directory).rglob("*") if p.is_file())
    return sum(p.stat().st_size for p in files), [str(p.relative_to(directory)) for p in files]


def has_subcommand(name: str) -> bool:
    help_run = subprocess.run([sys.executable, CONVERT, name, "--help"], cwd=REPO, env=child_env(), capture_output=True)
    return help_run.returncode == 0


def measure_export(command: str, store: str, output: str, checkpoint_bytes: int) -> dict:
    code, wall, rss = run_child([sys.executable, CONVERT, command, store, output, "--overwrite"])
    if code != 0:
        return {"command": command, "exit_code": code, "error": "the export failed: its output is above, on stderr"}
    size, files = directory_bytes(output)
    result = {
        "command": command,
        "exit_code": code,
        "wall_s": round(wall, 2),
        "peak_rss_mib": round(rss),
        "exported_bytes": size,
        "files": files,
        "checkpoint_mb_per_s": round(checkpoint_bytes / MB / wall, 1),
    }
    shutil.rmtree(output)
    return result


def markdown(report: dict, command: str) -> tuple[str, str]:
    rows = [
        f"| {r['command']} | {r['wall_s']:.1f} | {r['peak_rss_mib']:,} | {r['exported_bytes'] / MB:,.0f} | "
        f"{r['checkpoint_mb_per_s']:,.0f} |"
        for r in report["exports"]
        if r["exit_code"] == 0
    ]
    ckpt = report["checkpoint"]
    engine = f"DeepSpeed ZeRO-{ckpt['zero_stage']}" if ckpt["engine"] == "deepspeed" else ckpt["engine"]
    text = "\n".join(
        [
            heading("Exports of a ToST-Base checkpoint", report["device"]),
            "",
            f"`{command}`",
            "",
            f"`tools/convert.py` run as a subprocess on a {engine} checkpoint of a {ckpt['model']['name']} model "
            f"({ckpt['params'] / 1e6:.1f}M parameters; {ckpt['precision']}, {ckpt['world_size']} ranks, "
            f"{ckpt['bytes'] / MB:,.0f} MB in {ckpt['files']} files) on local disk: verify every sha256, join the "
            f"engine's shards, write fp32 safetensors. Startup (interpreter and imports): "
            f"{report['startup_s']:.1f} s. Peak RSS is the export process's own.",
            "",
            "| command | wall s | peak RSS MiB | exported MB | checkpoint MB/s |",
            "|---|---:|---:|---:|---:|",
            *rows,
            *([f"\n{report['note']}"] if report.get("note") else []),
        ]
    )
    return f"export | {report['device']}", text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report: dict = {
        "device": device_name(),
        "torch": torch.__version__,
        "deepspeed": importlib.metadata.version("deepspeed"),
    }
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        if args.checkpoint:
            store, train_s = args.checkpoint, None
        else:
            print(f"training one ZeRO-3 step of ToST-Base on 2 ranks ({args.precision})", file=sys.stderr)
            store, train_s = train_checkpoint(tmp, args.precision)
        step, manifest = newest_step(store)
        from pretrain.config import ModelConfig
        from pretrain.models import build_model

        model = ModelConfig(**manifest["config"]["model"])
        with torch.device("meta"):
            params = build_model(model).num_params()
        checkpoint_bytes = sum(entry["size"] for entry in manifest["files"].values())
        report["checkpoint"] = {
            "store": store if args.checkpoint else "(temporary)",
            "step": step,
            "engine": manifest["engine"],
            "zero_stage": manifest["config"]["engine"]["zero_stage"],
            "precision": manifest["config"]["engine"]["precision"],
            "world_size": manifest["world_size"],
            "model": {k: getattr(model, k) for k in ("name", "n_layer", "n_embd", "n_head", "seq_len", "vocab_size")},
            "params": params,
            "bytes": checkpoint_bytes,
            "files": len(manifest["files"]),
            "train_s": None if train_s is None else round(train_s, 1),
        }
        _, startup, _ = run_child([sys.executable, CONVERT, "export-safetensors", "--help"])
        report["startup_s"] = round(startup, 2)
        report["exports"] = []
        skipped = [name for name in EXPORTS if not has_subcommand(name)]
        if skipped:
            report["note"] = f"skipped: {', '.join(skipped)} (not a subcommand of tools/convert.py in this checkout)"
        for command in (name for name in EXPORTS if name not in skipped):
            for _ in range(args.repeats):
                print(f"{command} of step {step}", file=sys.stderr)
                result = measure_export(command, store, f"{tmp}/{command}", checkpoint_bytes)
                report["exports"].append(result)
                print(f"{command}: {result}", file=sys.stderr)
    publish(report, args.write_doc, lambda command: markdown(report, command))
    return 0 if all(r["exit_code"] == 0 for r in report["exports"]) else 1


if __name__ == "__main__":
    sys.exit(main())
