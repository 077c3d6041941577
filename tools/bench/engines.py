"""Benchmark the training engines: throughput, peak memory, final loss and MFU per variant.

    python tools/bench/engines.py --write-doc docs/benchmarks.md          # CPU: every engine, 2 ranks
    python tools/bench/engines.py --gpu --write-doc docs/benchmarks.md    # one GPU: the Base models

Default mode: the smoke models (tost_gpt2_smoke, gpt2_smoke) under DDP, DeepSpeed ZeRO-1/2/3 and
FSDP2 in a local gloo world. --gpu: ToST-Base and GPT2-Base on one CUDA process in bf16. Engines are
stepped directly on seeded random token batches (the data pipeline is not measured), and every
variant runs in a fresh local world, since peak RSS is a per-process high-water mark that an
earlier variant would otherwise set. One JSON object goes to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
import time

import torch
import torch.distributed as dist
from common import UNUSED_DATA, add_write_doc_flag, device_name, heading, publish

from pretrain.config import Config, load_config
from pretrain.distributed import DistInfo
from pretrain.engines import VARIANTS, build_engine
from pretrain.errors import UserError
from pretrain.launch import run_local_world
from pretrain.models import build_model
from pretrain.tracking.metrics import memory_gib, mfu, peak_flops
from pretrain.trainer import seed_everything

BAD_INPUT_EXIT = 2
SMOKE_MODELS = ("tost_gpt2_smoke", "gpt2_smoke")
BASE_MODELS = ("tost_gpt2", "gpt2")
CPU_ENGINES = {label: VARIANTS[label] for label in ("ddp", "zero1", "zero2", "zero3", "fsdp")}
GPU_ENGINES = {label: VARIANTS[label] for label in ("zero0", "ddp")}
# Per mode: (steps, micro-batch, global batch or None for one micro-batch per rank, ranks, precision).
MODE_DEFAULTS = {"cpu": (10, 4, 8, 2, "fp32"), "gpu": (50, 8, None, 1, "bf16")}
DATA_SEED = 0

ABOUT = """Optimizer steps of the training engines, driven directly on seeded random token batches (the data
pipeline is not included), after a few warmup steps: steps/s and tokens/s by wall clock on rank 0
between barriers, the peak memory of each rank (resident set size on CPU, which counts the
interpreter and the imported libraries and so mostly measures them for the tiny smoke models;
`torch.cuda.max_memory_allocated` on GPU), the final loss (mean over ranks; random tokens start
near ln 50304 = 10.83) and MFU where the device's bf16 peak is known. Every variant runs in a fresh
local process world so that no variant inherits another's memory high-water mark."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--gpu",
        action="store_true",
        help="benchmark ToST-Base and GPT2-Base on one CUDA GPU instead of the engines on CPU",
    )
    p.add_argument(
        "--gpu-engine",
        choices=sorted(GPU_ENGINES),
        default="zero0",
        help="engine for --gpu: DeepSpeed ZeRO-0 or plain PyTorch (default: zero0)",
    )
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing (default: 3)")
    p.add_argument("--steps", type=int, help="timed optimizer steps (default: 10; 50 with --gpu)")
    p.add_argument("--micro-batch", type=int, help="sequences per micro-batch (default: 4; 8 with --gpu)")
    p.add_argument(
        "--global-batch",
        type=int,
        help="sequences per optimizer step over all ranks (default: 8; the micro-batch with --gpu)",
    )
    p.add_argument(
        "--world-size", type=int, help="ranks of the local world (default: 2; --gpu runs 1 process and allows only 1)"
    )
    p.add_argument("--precision", choices=("fp32", "bf16"), help="engine.precision (default: fp32; bf16 with --gpu)")
    add_write_doc_flag(p)
    args = p.parse_args(argv)
    steps, micro, global_batch, world, precision = MODE_DEFAULTS["gpu" if args.gpu else "cpu"]
    args.steps = args.steps or steps
    args.micro_batch = args.micro_batch or micro
    args.world_size = args.world_size or world
    args.global_batch = args.global_batch or global_batch or args.micro_batch * args.world_size
    args.precision = args.precision or precision
    return args


def variants(args: argparse.Namespace) -> list[tuple[str, str, Config]]:
    """(model, engine, config) for every run of this mode; building the configs checks them early."""
    if args.gpu:
        if not torch.cuda.is_available():
            raise UserError("--gpu needs a CUDA GPU and torch finds none; run without --gpu for the CPU benchmark")
        if args.world_size != 1:
            raise UserError(f"--gpu runs one process; drop --world-size {args.world_size}")
        models, engines, extra = BASE_MODELS, {args.gpu_engine: GPU_ENGINES[args.gpu_engine]}, [UNUSED_DATA]
    else:
        models, engines, extra = SMOKE_MODELS, CPU_ENGINES, []
    runs = []
    for model in models:
        for engine, overrides in engines.items():
            cfg = load_config(
                [
                    f"+exp={model}",
                    *extra,
                    *overrides,
                    f"engine.precision={args.precision}",
                    f"train.global_batch_size={args.global_batch}",
                    f"train.micro_batch_size={args.micro_batch}",
                ]
            )
            runs.append((model, engine, cfg))
    return runs


def token_blocks(steps: int, cfg: Config) -> list[torch.Tensor]:
    """One global batch of (global_batch, seq_len + 1) random tokens per step, the same on every rank."""
    g = torch.Generator().manual_seed(DATA_SEED)
    shape = (cfg.train.global_batch_size, cfg.model.seq_len + 1)
    return [torch.randint(0, cfg.model.vocab_size, shape, generator=g) for _ in range(steps)]


def micro_batches(block: torch.Tensor, dist_info: DistInfo, micro: int) -> list[dict[str, torch.Tensor]]:
    """This rank's share of a global batch, cut into micro-batches as the data sampler would."""
    mine = block.chunk(dist_info.world_size)[dist_info.rank]
    return [{"input_ids": m[:, :-1], "labels": m[:, 1:]} for m in mine.split(micro)]


def synchronize(device: torch.device) -> None:
    """Every rank done with all queued work, so the wall clock brackets whole steps."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def bench_rank(dist_info: DistInfo, cfg: Config, warmup: int, steps: int) -> dict:
    """One variant on this rank: untimed warmup, then timed steps; returns timings, loss and memory."""
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # DeepSpeed logs to stdout, which carries the JSON
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model)
    flops_per_token = model.flops_per_token()  # before sharding, so it counts the whole model
    engine = build_engine(model, cfg, dist_info)
    batches = [micro_batches(b, dist_info, cfg.train.micro_batch_size) for b in token_blocks(warmup + steps, cfg)]
    for step_batches in batches[:warmup]:
        engine.train_step(step_batches)
    synchronize(dist_info.device)
    start = time.perf_counter()
    for step_batches in batches[warmup:]:
        loss = engine.train_step(step_batches).loss
    synchronize(dist_info.device)
    elapsed = time.perf_counter() - start
    mean_loss = torch.tensor([loss], dtype=torch.float64, device=dist_info.device)
    dist.all_reduce(mean_loss)
    return {
        "elapsed_s": elapsed,
        "loss": mean_loss.item() / dist_info.world_size,
        "memory_gib": memory_gib(dist_info.device),
        "flops_per_token": flops_per_token,
        "peak_flops": peak_flops(dist_info.device, cfg.engine.precision),
    }


def run_variant(model: str, engine: str, cfg: Config, args: argparse.Namespace) -> dict:
    """One variant in its own fresh local world; rank 0's clock, every rank's memory."""
    ranks = run_local_world(bench_rank, args.world_size, cfg, args.warmup, args.steps)
    elapsed = ranks[0]["elapsed_s"]
    tokens_per_s = args.steps * cfg.train.global_batch_size * cfg.model.seq_len / elapsed
    utilisation = mfu(tokens_per_s / args.world_size, ranks[0]["flops_per_token"], ranks[0]["peak_flops"])
    return {
        "model": model,
        "engine": engine,
        "steps_per_s": round(args.steps / elapsed, 3),
        "tokens_per_s": round(tokens_per_s, 1),
        "peak_mem_gib_per_rank": [round(r["memory_gib"], 3) for r in ranks],
        "final_loss": round(ranks[0]["loss"], 4),
        "mfu": None if utilisation is None else round(utilisation, 4),
    }


def markdown_section(report: dict, args: argparse.Namespace, command: str) -> tuple[str, str]:
    """(key, text) of this run's section; the key (mode, precision, device) decides what a rerun replaces."""
    mode = "gpu" if args.gpu else "cpu-engines"
    key = f"{mode} {report['precision']} | {report['device']}"
    title = "Base models, 1 GPU" if args.gpu else f"Engines on CPU, {report['world_size']} ranks"
    rows = [
        f"| {r['model']} | {r['engine']} | {r['steps_per_s']:.3f} | {r['tokens_per_s']:,.0f} | "
        f"{' / '.join(f'{m:.2f}' for m in r['peak_mem_gib_per_rank'])} | {r['final_loss']:.4f} | "
        f"{'-' if r['mfu'] is None else format(r['mfu'], '.1%')} |"
        for r in report["results"]
    ]
    text = "\n".join(
        [
            heading(f"{title}, {report['precision']}", report["device"]),
            "",
            f"`{command}`",
            "",
            ABOUT,
            "",
            f"torch {report['torch']}, DeepSpeed {report['deepspeed']}; {args.warmup} warmup + {args.steps} timed "
            f"steps, global batch {args.global_batch}, micro-batch {args.micro_batch} sequences.",
            "",
            "| model | engine | steps/s | tokens/s | peak GiB per rank | final loss | MFU |",
            "|---|---|---:|---:|---:|---:|---:|",
            *rows,
            "",
        ]
    )
    return key, text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runs = variants(args)
    except UserError as exc:
        print(f"engines: error: {exc}", file=sys.stderr)
        return BAD_INPUT_EXIT
    report = {
        "device": device_name(),
        "torch": torch.__version__,
        "deepspeed": importlib.metadata.version("deepspeed"),
        "world_size": args.world_size,
        "precision": args.precision,
        "results": [],
    }
    for i, (model, engine, cfg) in enumerate(runs, 1):
        start = time.perf_counter()
        result = run_variant(model, engine, cfg, args)
        report["results"].append(result)
        print(
            f"[{i}/{len(runs)}] {model} {engine}: {result['steps_per_s']:.3f} steps/s, "
            f"{result['tokens_per_s']:,.0f} tok/s, peak {max(result['peak_mem_gib_per_rank']):.2f} GiB, "
            f"loss {result['final_loss']:.4f} ({time.perf_counter() - start:.0f} s)",
            file=sys.stderr,
        )
    publish(report, args.write_doc, lambda command: markdown_section(report, args, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
