"""Benchmark the training engines: throughput, peak memory, final loss and MFU per variant.

    python tools/bench/engines.py --write-doc docs/benchmarks.md          # CPU: every engine, 2 ranks
    python tools/bench/engines.py --gpu --write-doc docs/benchmarks.md    # one GPU: the Base models
    python tools/bench/engines.py --gpu --steps 5 --contexts 1024         # one GPU, about a minute

Default mode: the smoke models (tost_gpt2_smoke, gpt2_smoke) under DDP, DeepSpeed ZeRO-1/2/3 and
FSDP2 in a local gloo world. --gpu: ToST-Base and GPT2-Base on one CUDA process in bf16, at each of
--contexts (1k, 4k and 8k tokens: `model.seq_len`, which sizes the position table and TSSA's
positional prior) under each of --gpu-engines (ZeRO-2 and FSDP2). Engines are stepped directly on
seeded random token batches (the data pipeline is not measured), and every run has a fresh local
world, since peak memory is a per-process high-water mark that an earlier run would otherwise set
(and a CUDA out-of-memory error, recorded as such, then takes nothing else down). One JSON object
goes to stdout; progress goes to stderr. More GPUs (ranks of one node) are out of this tool's
scope: `torchrun --nproc-per-node N pretrain/main.py +exp=...` logs tokens/s and MFU per step.
"""

from __future__ import annotations

import argparse
import dataclasses
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

BAD_INPUT_EXIT = 2
FAILED_RUN_EXIT = 1
SMOKE_MODELS = ("tost_gpt2_smoke", "gpt2_smoke")
BASE_MODELS = ("tost_gpt2", "gpt2")
MODEL_NAMES = {"tost_gpt2": "ToST-Base", "gpt2": "GPT2-Base"}
CPU_ENGINES = ("ddp", "zero1", "zero2", "zero3", "fsdp")
GPU_ENGINES = ("zero2", "fsdp")
GPU_CONTEXTS = (1024, 4096, 8192)
# --gpu's default micro-batch keeps the tokens per micro-batch (and so per optimizer step) the
# same at every context: 16 x 1k, 4 x 4k, 2 x 8k sequences.
GPU_TOKENS_PER_MICRO_BATCH = 16384
# Per mode: (warmup steps, timed steps, micro-batch, global batch, ranks, precision); a None
# micro-batch is the rule above, a None global batch one micro-batch per rank.
MODE_DEFAULTS = {"cpu": (3, 10, 4, 8, 2, "fp32"), "gpu": (5, 30, None, None, 1, "bf16")}
RUN_TIMEOUT_S = 600  # one run's local world: start, warmup (first Triton compiles included), timed steps
DATA_SEED = 0
MFU_GOAL = 0.5  # issue 18: GPT2-Base at 1k context, bf16, one GPU
MFU_UNKNOWN = "n/a (unknown device peak: pass --peak-tflops)"

ABOUT = """Optimizer steps of the training engines, driven directly on seeded random token batches (the data
pipeline is not included), after a few warmup steps: steps/s and tokens/s by wall clock on rank 0
between barriers, the peak memory of each rank (resident set size on CPU, which counts the
interpreter and the imported libraries and so mostly measures them for the tiny smoke models;
`torch.cuda.max_memory_allocated` on GPU), the final loss (mean over ranks; random tokens start
near ln 50304 = 10.83) and MFU where the device's bf16 peak is known. Every variant runs in a fresh
local process world so that no variant inherits another's memory high-water mark."""

ABOUT_GPU = """Optimizer steps of ToST-Base and GPT2-Base (`+exp=tost_gpt2`, `+exp=gpt2`; `model.seq_len` set to
each context) on one GPU, driven directly on seeded random token batches (the data pipeline is not
included), one micro-batch per step, each run in a fresh process. tokens/s: by wall clock between
CUDA synchronizations over the timed steps, which follow the warmup steps. MFU: tokens/s x the model's
training FLOPs per token at that context (`CausalLM.flops_per_token`: 6 per matmul weight, plus
softmax attention's 12 T D per layer, which grows with the context T, or causal TSSA's 36 D per
layer, which does not; docs/models.md) over the device's dense peak for the precision. Peak memory:
`torch.cuda.max_memory_allocated` over the whole run (weights, optimizer state, activations)."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One benchmark run: a model recipe under one engine at one context and batch."""

    model: str
    engine: str
    seq_len: int | None  # None: the recipe's own
    micro_batch: int
    global_batch: int

    def overrides(self, precision: str, compile_blocks: bool) -> list[str]:
        """The config overrides of this run (the GPU runs never read data, but their recipe needs URLs)."""
        return [
            f"+exp={self.model}",
            *([UNUSED_DATA] if self.model in BASE_MODELS else []),
            *VARIANTS[self.engine],
            f"engine.precision={precision}",
            *(["engine.compile=true"] if compile_blocks else []),
            f"train.global_batch_size={self.global_batch}",
            f"train.micro_batch_size={self.micro_batch}",
            *([] if self.seq_len is None else [f"model.seq_len={self.seq_len}"]),
        ]


def gpu_micro_batch(seq_len: int) -> int:
    """--gpu's default micro-batch: GPU_TOKENS_PER_MICRO_BATCH tokens, at least one sequence."""
    return max(1, GPU_TOKENS_PER_MICRO_BATCH // seq_len)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--gpu",
        action="store_true",
        help="benchmark ToST-Base and GPT2-Base on one CUDA GPU instead of the engines on CPU",
    )
    p.add_argument(
        "--gpu-engines",
        nargs="+",
        choices=list(VARIANTS),
        default=list(GPU_ENGINES),
        metavar="ENGINE",
        help=f"engines for --gpu, of {', '.join(VARIANTS)} (default: {' '.join(GPU_ENGINES)})",
    )
    p.add_argument(
        "--contexts",
        nargs="+",
        type=int,
        default=list(GPU_CONTEXTS),
        metavar="TOKENS",
        help=f"context lengths (model.seq_len) for --gpu (default: {' '.join(map(str, GPU_CONTEXTS))})",
    )
    p.add_argument("--warmup", type=int, help="untimed steps before timing (default: 3; 5 with --gpu)")
    p.add_argument("--steps", type=int, help="timed optimizer steps (default: 10; 30 with --gpu)")
    p.add_argument(
        "--micro-batch",
        type=int,
        help=f"sequences per micro-batch (default: 4; with --gpu {GPU_TOKENS_PER_MICRO_BATCH} tokens' worth at each "
        "context: 16 at 1k, 4 at 4k, 2 at 8k)",
    )
    p.add_argument(
        "--global-batch",
        type=int,
        help="sequences per optimizer step over all ranks (default: 8; --gpu steps one micro-batch and takes none)",
    )
    p.add_argument(
        "--world-size", type=int, help="ranks of the local world (default: 2; --gpu runs 1 process and allows only 1)"
    )
    p.add_argument("--precision", choices=("fp32", "bf16"), help="engine.precision (default: fp32; bf16 with --gpu)")
    p.add_argument(
        "--compile", action="store_true", help="engine.compile=true: torch.compile each block (the warmup compiles)"
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        help="the device's dense peak for --precision in TFLOP/s, for MFU (default: the known GPUs' bf16 peak)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        metavar="SECONDS",
        help="start no run after this many seconds; the runs left are recorded as skipped (default: no limit)",
    )
    add_write_doc_flag(p)
    args = p.parse_args(argv)
    warmup, steps, micro, global_batch, world, precision = MODE_DEFAULTS["gpu" if args.gpu else "cpu"]
    args.warmup = warmup if args.warmup is None else args.warmup
    args.steps = steps if args.steps is None else args.steps
    args.micro_batch = micro if args.micro_batch is None else args.micro_batch
    args.world_size = world if args.world_size is None else args.world_size
    if args.gpu and args.global_batch:
        p.error("--gpu steps one micro-batch per optimizer step: drop --global-batch (set --micro-batch)")
    if not args.gpu:
        args.global_batch = args.global_batch or global_batch or args.micro_batch * args.world_size
    args.precision = args.precision or precision
    if args.gpu and args.world_size != 1:
        p.error(f"--gpu runs one process; drop --world-size {args.world_size}")
    if (
        min(args.contexts) < 1
        or (args.micro_batch is not None and args.micro_batch < 1)
        or args.steps < 1
        or args.warmup < 0
    ):
        p.error("--contexts, --micro-batch and --steps must be positive, --warmup not negative")
    return args


def plan(args: argparse.Namespace) -> list[Run]:
    """Every run of this mode, in order. --gpu: per context (the goal's 1k first, by default), per
    engine, both models, so that a time budget cut leaves whole comparisons."""
    if not args.gpu:
        return [
            Run(model, engine, None, args.micro_batch, args.global_batch)
            for model in SMOKE_MODELS
            for engine in CPU_ENGINES
        ]
    runs = []
    for seq_len in args.contexts:
        micro = args.micro_batch or gpu_micro_batch(seq_len)
        runs += [Run(model, engine, seq_len, micro, micro) for engine in args.gpu_engines for model in BASE_MODELS]
    return runs


def variants(args: argparse.Namespace) -> list[tuple[Run, Config]]:
    """(run, config) for every run of this mode; building the configs checks them early."""
    if args.gpu and not torch.cuda.is_available():
        raise UserError("--gpu needs a CUDA GPU and torch finds none; run without --gpu for the CPU benchmark")
    return [(run, load_config(run.overrides(args.precision, args.compile))) for run in plan(args)]


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


def bench_rank(dist_info: DistInfo, cfg: Config, warmup: int, steps: int, peak_tflops: float | None) -> dict:
    """One variant on this rank: untimed warmup, then timed steps; returns timings, loss and memory.
    A CUDA out-of-memory error is returned as such (this process then exits, freeing the GPU)."""
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # DeepSpeed logs to stdout, which carries the JSON
    torch.manual_seed(cfg.train.seed)  # the weights' initialisation; the tokens have their own generator
    model = build_model(cfg.model)
    flops_per_token = model.flops_per_token()  # before sharding, so it counts the whole model
    batches = [micro_batches(b, dist_info, cfg.train.micro_batch_size) for b in token_blocks(warmup + steps, cfg)]
    try:
        engine = build_engine(model, cfg, dist_info)
        for step_batches in batches[:warmup]:
            engine.train_step(step_batches)
        synchronize(dist_info.device)
        start = time.perf_counter()
        for step_batches in batches[warmup:]:
            loss = engine.train_step(step_batches).loss
        synchronize(dist_info.device)
        elapsed = time.perf_counter() - start
    except torch.cuda.OutOfMemoryError as exc:
        return {"status": "oom", "message": str(exc).splitlines()[0], "memory_gib": memory_gib(dist_info.device)}
    mean_loss = torch.tensor([loss], dtype=torch.float64, device=dist_info.device)
    dist.all_reduce(mean_loss)
    return {
        "status": "ok",
        "elapsed_s": elapsed,
        "loss": mean_loss.item() / dist_info.world_size,
        "memory_gib": memory_gib(dist_info.device),
        "flops_per_token": flops_per_token,
        "peak_flops": peak_flops(dist_info.device, cfg.engine.precision, peak_tflops),  # the override wins
    }


def run_variant(run: Run, cfg: Config, args: argparse.Namespace) -> dict:
    """One variant in its own fresh local world; rank 0's clock, every rank's memory. A run whose
    world fails is recorded as failed (its error's last line), so that the others still run."""
    result = {
        "model": run.model,
        "engine": run.engine,
        "seq_len": cfg.model.seq_len,
        "micro_batch": run.micro_batch,
        "global_batch": run.global_batch,
    }
    bench_args = (cfg, args.warmup, args.steps, args.peak_tflops)
    try:
        ranks = run_local_world(bench_rank, args.world_size, *bench_args, timeout_s=RUN_TIMEOUT_S)
    except (RuntimeError, TimeoutError) as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        return {**result, "status": "failed", "message": lines[-1] if lines else type(exc).__name__}
    if ranks[0]["status"] != "ok":
        return {**result, "status": ranks[0]["status"], "message": ranks[0]["message"]}
    elapsed = ranks[0]["elapsed_s"]
    tokens_per_s = args.steps * run.global_batch * cfg.model.seq_len / elapsed
    utilisation = mfu(tokens_per_s / args.world_size, ranks[0]["flops_per_token"], ranks[0]["peak_flops"])
    return {
        **result,
        "status": "ok",
        "steps_per_s": round(args.steps / elapsed, 3),
        "tokens_per_s": round(tokens_per_s, 1),
        "peak_mem_gib_per_rank": [round(r["memory_gib"], 3) for r in ranks],
        "final_loss": round(ranks[0]["loss"], 4),
        "flops_per_token": ranks[0]["flops_per_token"],
        "peak_tflops": None if ranks[0]["peak_flops"] is None else ranks[0]["peak_flops"] / 1e12,
        "mfu": None if utilisation is None else round(utilisation, 4),
    }


def markdown_section(report: dict, args: argparse.Namespace, command: str) -> tuple[str, str]:
    """(key, text) of this run's section; the key (mode, precision, device) decides what a rerun replaces."""
    if args.gpu:
        return gpu_section(report, args, command)
    key = f"cpu-engines {report['precision']} | {report['device']}"
    rows = [
        f"| {r['model']} | {r['engine']} | {r['steps_per_s']:.3f} | {r['tokens_per_s']:,.0f} | "
        f"{' / '.join(f'{m:.2f}' for m in r['peak_mem_gib_per_rank'])} | {r['final_loss']:.4f} | "
        f"{'-' if r['mfu'] is None else format(r['mfu'], '.1%')} |"
        if r["status"] == "ok"
        else f"| {r['model']} | {r['engine']} | {r['status']}: {r['message']} | | | | |"
        for r in report["results"]
    ]
    text = "\n".join(
        [
            heading(f"Engines on CPU, {report['world_size']} ranks, {report['precision']}", report["device"]),
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


def goal_checks(results: list[dict]) -> dict:
    """Issue 18's goals, per engine, from the measured runs (None where a run is missing):
    GPT2-Base's MFU at 1k context (goal >= MFU_GOAL), and ToST-Base's tokens/s over GPT2-Base's at
    1k (goal >= 1) and at 8k (goal: well above 1)."""
    ok = {(r["model"], r["engine"], r["seq_len"]): r for r in results if r["status"] == "ok"}
    engines = list(dict.fromkeys(r["engine"] for r in results))

    def ratio(engine: str, seq_len: int) -> float | None:
        tost, gpt2 = ok.get(("tost_gpt2", engine, seq_len)), ok.get(("gpt2", engine, seq_len))
        return round(tost["tokens_per_s"] / gpt2["tokens_per_s"], 3) if tost and gpt2 else None

    return {
        engine: {
            "gpt2_mfu_1k": ok[("gpt2", engine, 1024)]["mfu"] if ("gpt2", engine, 1024) in ok else None,
            "tost_over_gpt2_1k": ratio(engine, 1024),
            "tost_over_gpt2_8k": ratio(engine, 8192),
        }
        for engine in engines
    }


def goal_line(checks: dict) -> str:
    """The goal checks as one sentence of the docs section."""

    def mfu_text(value: float | None) -> str:
        if value is None:
            return "not measured"
        return f"{value:.1%} ({'met' if value >= MFU_GOAL else 'not met'})"

    def ratio_text(value: float | None, goal: bool) -> str:
        if value is None:
            return "not measured"
        return f"{value:.2f}x" + (f" ({'met' if value >= 1 else 'not met'})" if goal else "")

    parts = [
        f"{engine}: GPT2-Base MFU at 1k {mfu_text(c['gpt2_mfu_1k'])}; ToST-Base / GPT2-Base tokens/s at 1k "
        f"{ratio_text(c['tost_over_gpt2_1k'], goal=True)}, at 8k {ratio_text(c['tost_over_gpt2_8k'], goal=False)}"
        for engine, c in checks.items()
    ]
    return (
        f"Goals (issue 18: GPT2-Base at 1k context >= {MFU_GOAL:.0%} MFU; ToST-Base's tokens/s at least GPT2-Base's "
        "at 1k, well above it at 8k), from the table: " + "; ".join(parts) + "."
    )


def gpu_section(report: dict, args: argparse.Namespace, command: str) -> tuple[str, str]:
    """--gpu's section: the device, one row per model x engine x context, and the goal checks."""
    results = report["results"]

    def row(r: dict) -> str:
        head = f"| {MODEL_NAMES[r['model']]} | {r['engine']} | {r['seq_len']:,} | {r['micro_batch']} |"
        if r["status"] != "ok":
            return f"{head} {r['status']}: {r['message']} | | |"
        mfu_cell = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
        return f"{head} {r['tokens_per_s']:,.0f} | {mfu_cell} | {r['peak_mem_gib_per_rank'][0]:.2f} |"

    peaks = sorted({r["peak_tflops"] for r in results if r["status"] == "ok" and r["peak_tflops"] is not None})
    peak_text = (
        f"Device peak for MFU: {', '.join(f'{p:,.0f}' for p in peaks)} TFLOP/s "
        + ("(--peak-tflops)." if args.peak_tflops else f"(dense {report['precision']}, pretrain.tracking.metrics).")
        if peaks
        else ""
    )
    unknown = any(r["status"] == "ok" and r["mfu"] is None for r in results)
    gpu = report["gpu"]
    text = "\n".join(
        [
            heading(
                f"Base models, 1 GPU, {report['precision']}" + (", compiled blocks" if args.compile else ""),
                report["device"],
            ),
            "",
            f"`{command}`",
            "",
            ABOUT_GPU,
            "",
            f"{gpu['name']}, {gpu['memory_gib']:.0f} GiB; torch {report['torch']}, CUDA {gpu['cuda']}, DeepSpeed "
            f"{report['deepspeed']}; {args.warmup} warmup + {args.steps} timed steps per run; micro-batch "
            + (
                f"{args.micro_batch} sequences."
                if args.micro_batch
                else f"{GPU_TOKENS_PER_MICRO_BATCH:,} tokens' worth at each context ({GPU_TOKENS_PER_MICRO_BATCH:,} // "
                "context sequences, at least 1)."
            ),
            "",
            "| model | engine | context | micro-batch | tokens/s | MFU | peak GiB |",
            "|---|---|---:|---:|---:|---:|---:|",
            *map(row, results),
            "",
            *([f"MFU {MFU_UNKNOWN}.", ""] if unknown else ([peak_text, ""] if peak_text else [])),
            goal_line(report["goals"]),
            "",
        ]
    )
    mode = "gpu-compile" if args.compile else "gpu"
    return f"{mode} {report['precision']} | {report['device']}", text


def gpu_info() -> dict:
    """The GPU of the --gpu runs, for the report: name, memory and torch's CUDA version."""
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda}


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
        "compile": args.compile,
        "results": [],
    }
    if args.gpu:
        report["gpu"] = gpu_info()
    started = time.perf_counter()
    for i, (run, cfg) in enumerate(runs, 1):
        name = f"[{i}/{len(runs)}] {run.model} {run.engine} {cfg.model.seq_len} x {run.micro_batch}"
        if args.time_budget is not None and time.perf_counter() - started > args.time_budget:
            result = {
                **dataclasses.asdict(run),
                "seq_len": cfg.model.seq_len,
                "status": "skipped",
                "message": f"past --time-budget {args.time_budget:.0f} s",
            }
            report["results"].append(result)
            print(f"{name}: skipped, {result['message']}", file=sys.stderr)
            continue
        start = time.perf_counter()
        result = run_variant(run, cfg, args)
        report["results"].append(result)
        print(
            f"{name}: "
            + (
                f"{result['steps_per_s']:.3f} steps/s, {result['tokens_per_s']:,.0f} tok/s, "
                f"peak {max(result['peak_mem_gib_per_rank']):.2f} GiB, loss {result['final_loss']:.4f}, "
                f"MFU {MFU_UNKNOWN if result['mfu'] is None else format(result['mfu'], '.1%')}"
                if result["status"] == "ok"
                else f"{result['status']}: {result['message']}"
            )
            + f" ({time.perf_counter() - start:.0f} s)",
            file=sys.stderr,
        )
    if args.gpu:
        report["goals"] = goal_checks(report["results"])
    publish(report, args.write_doc, lambda command: markdown_section(report, args, command))
    return FAILED_RUN_EXIT if any(r["status"] == "failed" for r in report["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
