"""Benchmark one token-mixing layer, forward + backward, from 1k to 64k tokens where time and
memory allow: TSSA's implementations (eager, fused, and on a GPU triton) against softmax attention
(SDPA); and ToSTLM generation, recurrent steps against re-running the prefix, with the time to
read a prompt token by token against one parallel prefill.

    python tools/bench/attention.py --write-doc docs/benchmarks.md         # GPU if torch finds one, else CPU
    python tools/bench/attention.py --device cpu --tokens 1k 4k --repeats 5 --variants tssa_causal_fused softmax_causal
    python tools/bench/attention.py --only document-mask --write-doc docs/benchmarks.md   # its own section, 8k tokens

Layers: `TSSA` (non-causal, vision) and `CausalTSSA`, each built with `model.tssa_impl` eager (the
reference chain of ops), fused (one chunked custom op with a hand-written backward) and, with
--device cuda, triton; against `SelfAttention` non-causal and causal (F.scaled_dot_product_attention).
All from one ModelConfig of the same width (D 768, 12 heads; fp32 on CPU, bf16 autocast on GPU),
batch 1. Per sequence length: the median wall time of forward + backward (loss = output.sum(),
gradients for the input and the weights) after a warmup pass; the peak memory of one such pass
above what was allocated before it; and the bytes autograd saves for backward in one forward
(every distinct storage a `saved_tensors_hooks` pack hook sees, once, the layer's parameters
excepted, its input included), from one more forward after the measurements. On CPU every case
runs in a fresh process (forked from a server that has imported torch), whose peak resident set
size is reset through /proc/self/clear_refs just before the measured pass; on GPU,
torch.cuda.max_memory_allocated after reset_peak_memory_stats. A case whose time or memory,
extrapolated from the smaller lengths of the same layer, would pass --max-case-seconds or
--memory-limit-gib is skipped and marked so, not run. Scaling exponents are least-squares slopes of
log(time) and log(memory) against log(tokens), over all measured lengths and over those >= 4k.
Targets: at 8k tokens (or the measured length nearest it), fused (and triton) TSSA's time over
eager TSSA's and over SDPA's, and its saved-for-backward bytes over SDPA's, causal and not.

Generation: a small ToSTLM (4 layers of the same width, `model.tssa_impl` auto). Time per new
token at each position of the recurrent `step` (O(D) state per layer), against running the
parallel forward over the whole prefix to get the same next-token logits, which is what a model
without a recurrent form (and without a KV cache) does per token; slopes of log(time per token)
against log(position). Time to first token at the largest position: the prompt read by `step`
from `init_states(1)`, token by token (what `generate` did before), against one `prefill(prompt)`
(what it does now), both with no gradients, and how far their next-token logits differ.

Document masking (`--only document-mask`, a section of its own): at one length (default 8k), the
causal layers (fused TSSA, on a GPU triton TSSA, and SDPA) with and without `document_ids` for
documents of random lengths (exponential, mean --document-tokens, seed 0), measured as above; the
cost is the masked time over the unmasked one. SDPA gets a boolean block-diagonal causal mask, which
takes it off the flash kernel on a GPU (the section names the kernels it ran).

Writes a log-log plot (--plot, default docs/attention_scaling.png). One JSON object goes to
stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import multiprocessing as mp
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from common import add_write_doc_flag, device_name, heading, publish

from pretrain.config import ModelConfig
from pretrain.errors import UserError
from pretrain.models.attention import SelfAttention
from pretrain.models.layers import split_heads
from pretrain.models.tost import TSSA, CausalTSSA, ToSTLM, resolve_impl, statistics_impl

# name -> (label, layer kind, model.tssa_impl); the order of the tables' columns.
VARIANTS = {
    "tssa_eager": ("TSSA eager", "tssa", "eager"),
    "tssa_fused": ("TSSA fused", "tssa", "fused"),
    "tssa_triton": ("TSSA triton", "tssa", "triton"),
    "softmax": ("softmax (SDPA)", "softmax", None),
    "tssa_causal_eager": ("causal TSSA eager", "tssa_causal", "eager"),
    "tssa_causal_fused": ("causal TSSA fused", "tssa_causal", "fused"),
    "tssa_causal_triton": ("causal TSSA triton", "tssa_causal", "triton"),
    "softmax_causal": ("causal softmax (SDPA)", "softmax_causal", None),
    # The statistics alone (token_statistics on the heads of x, no U or out_proj): the operator itself.
    "core_eager": ("TSSA core eager", "core", "eager"),
    "core_fused": ("TSSA core fused", "core", "fused"),
    "core_triton": ("TSSA core triton", "core", "triton"),
    "core_causal_eager": ("causal TSSA core eager", "core_causal", "eager"),
    "core_causal_fused": ("causal TSSA core fused", "core_causal", "fused"),
    "core_causal_triton": ("causal TSSA core triton", "core_causal", "triton"),
}
GPU_ONLY = {"tssa_triton", "tssa_causal_triton", "core_triton", "core_causal_triton"}
# Per form (a key of report["targets"]): (the eager TSSA variant, the SDPA variant, {impl: TSSA variant}).
FORMS = {
    "non_causal": ("tssa_eager", "softmax", {"fused": "tssa_fused", "triton": "tssa_triton"}),
    "causal": ("tssa_causal_eager", "softmax_causal", {"fused": "tssa_causal_fused", "triton": "tssa_causal_triton"}),
}
CORES = {"non_causal": "core", "causal": "core_causal"}  # per form, the prefix of its core variants
WIDTH, HEADS = 768, 12  # on CPU and GPU alike
PRECISION = {"cpu": "fp32", "cuda": "bf16"}
PLOT = {"cpu": "docs/attention_scaling.png", "cuda": "docs/attention_scaling_gpu.png"}
DEFAULT_TOKENS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
DEFAULT_POSITIONS = [128, 256, 512, 1024, 2048, 4096]
TARGET_TOKENS = 8192  # the length of the targets summary (or the measured one nearest it)
FIT_FROM_TOKENS = 4096  # the second exponent fits the measured lengths from this one up
GEN_LAYERS = 4
DOCUMENT_TOKENS = 512  # mean document length of the document-mask measurement
DOCUMENT_MASK_VARIANTS = ("tssa_causal_fused", "tssa_causal_triton", "softmax_causal")
GEN_VOCAB = 50304
STEP_WINDOW = 16  # recurrent steps whose median is the time per token at a position
MIN_REPETITION_S = 0.05  # a repetition loops over passes until it lasts about this long
MEMORY_PASSES = 2  # peak memory is the largest of this many measured passes
MiB = 2**20
# On CPU a case is measured again (once) when other processes kept more than this share of the
# cores busy while it ran: the project's machines are shared, and a busy core slows every case.
RETRY_OTHER_LOAD = 0.2
RETRIES = 2
QUIET_WINDOW_S = 0.3  # before a case, the machine's load is sampled over windows this long
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter

IMPLS_HOW = (
    "TSSA and causal TSSA run each implementation `model.tssa_impl` names: eager (the reference chain of "
    "full-length ops, each of whose outputs autograd keeps) and fused (one chunked custom op, out_proj "
    "included, with a hand-written backward that recomputes its temporaries instead of keeping them)"
)
MEMORY_HOW = {
    "cpu": "on CPU each case runs in a fresh process (forked from a server that imported torch "
    "once); after the timed passes glibc's mmap threshold is fixed at 64 KiB and the heap trimmed, "
    "so that freed buffers leave the resident set, the kernel's peak RSS is reset through "
    "`/proc/self/clear_refs`, and memory is the peak RSS during a pass minus the RSS just before it, gradients cleared "
    f"(the largest of {MEMORY_PASSES} passes).",
    "cuda": "`torch.cuda.max_memory_allocated` during a pass (after `reset_peak_memory_stats`) minus "
    f"`memory_allocated` just before it, gradients cleared (the largest of {MEMORY_PASSES} passes).",
}


# ----------------------------------------------------------------------------------------------
# Arguments


def token_count(text: str) -> int:
    """'4096', '4k' or '16K' -> tokens."""
    match = re.fullmatch(r"(\d+)([kK]?)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (e.g. 4096 or 4k)")
    return int(match.group(1)) * (1024 if match.group(2) else 1)


def mem_available_gib() -> float | None:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    match = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) / 2**20 if match else None


def triton_unavailable() -> str | None:
    """None when model.tssa_impl=triton can run on this machine's GPU, else why not."""
    try:
        resolve_impl("triton", torch.device("cuda"))
    except UserError as err:
        return str(err)
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to run (default: auto, the GPU when torch finds one)",
    )
    p.add_argument("--width", type=int, default=WIDTH, help=f"model width D (default: {WIDTH})")
    p.add_argument("--heads", type=int, default=HEADS, help=f"heads K (default: {HEADS})")
    p.add_argument(
        "--precision", choices=("fp32", "bf16"), help="fp32, or bf16 autocast (default: fp32 on CPU, bf16 on GPU)"
    )
    p.add_argument(
        "--tokens",
        type=token_count,
        nargs="+",
        metavar="N",
        help="sequence lengths, e.g. 256 1k 16k (default: 1k 2k 4k 8k 16k 32k 64k; 8k with --only document-mask)",
    )
    p.add_argument("--max-tokens", type=token_count, help="drop the --tokens above this")
    p.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        metavar="NAME",
        help=f"layers to measure, of {', '.join(VARIANTS)} (default: all; the triton ones need --device cuda)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions per case (default: 3)")
    p.add_argument(
        "--memory-limit-gib",
        type=float,
        help="skip a case whose extrapolated peak memory is above this (default: on CPU 60%% of "
        "MemAvailable at the start, on GPU 90%% of the GPU's memory)",
    )
    p.add_argument(
        "--max-case-seconds",
        type=float,
        default=120.0,
        help="skip a case whose extrapolated run (warmup, repetitions, memory passes, the saved-bytes "
        "forward) would take longer than this (default: 120)",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="on CPU, wait in all up to this long, before the cases, for other processes to leave "
        "the cores (default: 120)",
    )
    p.add_argument(
        "--positions",
        type=token_count,
        nargs="+",
        default=DEFAULT_POSITIONS,
        metavar="T",
        help="generation positions; the time to first token reads a prompt of the largest "
        "(default: 128 256 512 1k 2k 4k); 0 positions skips generation",
    )
    p.add_argument("--gen-layers", type=int, default=GEN_LAYERS, help="layers of the generation ToSTLM (default: 4)")
    p.add_argument(
        "--only",
        choices=("document-mask",),
        help="document-mask: only the cost of document masking (the causal layers with and without "
        "document_ids), in a section of its own",
    )
    p.add_argument(
        "--document-tokens",
        type=token_count,
        default=DOCUMENT_TOKENS,
        metavar="N",
        help=f"mean document length for --only document-mask (default: {DOCUMENT_TOKENS})",
    )
    p.add_argument(
        "--plot",
        type=Path,
        help="log-log plot to write (default: docs/attention_scaling.png, on GPU docs/attention_scaling_gpu.png, so "
        "that each section of docs/benchmarks.md keeps its own)",
    )
    add_write_doc_flag(p)
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda needs a CUDA GPU and torch finds none")
    args.precision = args.precision or PRECISION[args.device]
    args.plot = args.plot or Path(PLOT[args.device])
    if args.width % args.heads:
        p.error(f"--width {args.width} is not a multiple of --heads {args.heads}")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.tokens is None:
        args.tokens = [TARGET_TOKENS] if args.only == "document-mask" else DEFAULT_TOKENS
    if args.only == "document-mask" and args.variants is None:
        args.variants = [v for v in DOCUMENT_MASK_VARIANTS if args.device == "cuda" or v not in GPU_ONLY]
    elif args.only == "document-mask" and set(args.variants) - set(DOCUMENT_MASK_VARIANTS):
        p.error(f"--only document-mask measures the causal layers: {', '.join(DOCUMENT_MASK_VARIANTS)}")
    if args.variants is None:
        args.variants = [v for v in VARIANTS if args.device == "cuda" or v not in GPU_ONLY]
        reason = triton_unavailable() if args.device == "cuda" else None
        if reason:
            print(f"leaving out the triton variants: {reason}", file=sys.stderr)
            args.variants = [v for v in args.variants if v not in GPU_ONLY]
    else:
        args.variants = [v for v in VARIANTS if v in args.variants]  # the tables' order
        asked = GPU_ONLY.intersection(args.variants)
        if asked and args.device != "cuda":
            p.error(f"the triton variants ({', '.join(sorted(asked))}) need --device cuda")
        reason = triton_unavailable() if asked else None
        if reason:
            p.error(reason)
    args.tokens = sorted({n for n in args.tokens if args.max_tokens is None or n <= args.max_tokens})
    if not args.tokens:
        p.error("no --tokens left at or below --max-tokens")
    args.positions = sorted({t for t in args.positions if t > 0})  # --positions 0: no generation
    if args.memory_limit_gib is None:
        if args.device == "cuda":
            args.memory_limit_gib = 0.9 * torch.cuda.get_device_properties(0).total_memory / 2**30
        else:
            available = mem_available_gib()
            args.memory_limit_gib = 0.6 * available if available else 8.0
    return args


# ----------------------------------------------------------------------------------------------
# Measuring (these run in a fresh worker process on CPU, in the main process on GPU)


def autocast(device: str, precision: str):
    return torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def layer_config(width: int, heads: int, seq_len: int, tssa_impl: str = "eager") -> ModelConfig:
    return ModelConfig(n_embd=width, n_head=heads, seq_len=seq_len, bias=False, dropout=0.0, tssa_impl=tssa_impl)


class TSSACore(torch.nn.Module):
    """The TSSA statistics alone, as model.tssa_impl computes them: x (B, T, D), read as the heads'
    projected tokens w, -> c (B, K, T, p). A TSSA layer less its two projections."""

    def __init__(self, cfg: ModelConfig, causal: bool) -> None:
        super().__init__()
        self.n_head, self.causal, self.tssa_impl = cfg.n_head, causal, cfg.tssa_impl
        self.temp = torch.nn.Parameter(torch.ones(cfg.n_head, 1))
        self.denom_bias = torch.nn.Parameter(torch.zeros(cfg.n_head, cfg.seq_len)) if causal else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):  # as a layer's w, the output of the Linear U, would be
            x = x.to(torch.get_autocast_dtype(x.device.type))
        statistics = statistics_impl(self.tssa_impl, x.device)
        return statistics(split_heads(x, self.n_head), self.temp, causal=self.causal, denom_bias=self.denom_bias)[0]


def build_layer(variant: str, width: int, heads: int, n: int) -> torch.nn.Module:
    _label, kind, impl = VARIANTS[variant]
    cfg = layer_config(width, heads, n, impl or "eager")
    if kind.startswith("core"):
        return TSSACore(cfg, causal=kind == "core_causal")
    if kind == "tssa":
        return TSSA(cfg)
    if kind == "tssa_causal":
        return CausalTSSA(cfg)
    return SelfAttention(cfg, causal=kind == "softmax_causal", n_tokens=n)


class PeakRSS:
    """The process's peak resident set size since the last reset (Linux: VmHWM, reset by
    writing 5 to /proc/self/clear_refs)."""

    @staticmethod
    def _status(field: str) -> int:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
        return int(match.group(1)) * 1024

    @classmethod
    def reset(cls) -> int:
        """Frees what glibc holds, resets the peak; returns the RSS now."""
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        return cls._status("VmRSS")

    @classmethod
    def peak(cls) -> int:
        return cls._status("VmHWM")

    @staticmethod
    def release_freed_buffers() -> None:
        """A fixed mmap threshold (instead of glibc's, which grows to 32 MiB as big buffers are
        freed) maps every buffer of 64 KiB or more on its own and unmaps it when freed, so the
        RSS follows what is allocated instead of what glibc keeps for reuse."""
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 1024)


def saved_for_backward_bytes(
    layer: torch.nn.Module, forward: Callable[[], torch.Tensor], device: str, precision: str
) -> int:
    """Bytes autograd keeps for the backward of one forward of `layer` (`forward()`): each distinct
    storage a saved tensor lives in, once, except the layer's parameters' (its input counts). The
    graph is freed before returning."""
    own = {param.untyped_storage().data_ptr() for param in layer.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(device, precision):
        y = forward()
    del y  # the graph, and with it every saved tensor
    return sum(storages.values())


def random_documents(n: int, mean_tokens: int, seed: int = 0) -> torch.Tensor:
    """document_ids (1, n) of packed documents of random lengths: 1 + exponential of mean `mean_tokens`."""
    g = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < n:
        lengths.append(1 + int(torch.empty(1).exponential_(1 / mean_tokens, generator=g)))
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None, :n]


def measure_layer(
    variant: str,
    n: int,
    width: int,
    heads: int,
    device: str,
    precision: str,
    repeats: int,
    document_tokens: int | None = None,
) -> dict:
    """Forward + backward of one layer on (1, n, width): median seconds per pass, peak bytes, and
    the bytes saved for backward. With document_tokens, the layer gets document_ids of documents
    of that mean length."""
    torch.manual_seed(0)
    layer = build_layer(variant, width, heads, n).to(device)
    x = torch.randn(1, n, width, device=device, requires_grad=True)
    masking = {} if document_tokens is None else {"document_ids": random_documents(n, document_tokens).to(device)}

    def clear_grads() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None

    def one_pass() -> None:
        clear_grads()
        with autocast(device, precision):
            y = layer(x, **masking)
        y.float().sum().backward()

    sync(device)  # the layer's and the input's copies to the device are not the warmup's
    start = time.perf_counter()
    one_pass()  # warmup
    sync(device)
    first = time.perf_counter() - start
    start = time.perf_counter()
    one_pass()
    sync(device)
    second = time.perf_counter() - start
    inner = max(1, math.ceil(MIN_REPETITION_S / max(second, 1e-6)))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            one_pass()
        sync(device)
        times.append((time.perf_counter() - start) / inner)

    peaks = []
    if device == "cuda":
        for _ in range(MEMORY_PASSES):
            clear_grads()  # a pass frees the last one's gradients first: they are not part of the base
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            one_pass()
            sync(device)
            peaks.append(torch.cuda.max_memory_allocated() - base)
    else:
        PeakRSS.release_freed_buffers()
        for _ in range(MEMORY_PASSES):
            clear_grads()
            base = PeakRSS.reset()
            one_pass()
            peaks.append(PeakRSS.peak() - base)
    saved = saved_for_backward_bytes(layer, lambda: layer(x, **masking), device, precision)  # after the passes
    return {
        "seconds": statistics.median(times),
        "seconds_all": times,
        "passes_per_repetition": inner,
        "warmup_seconds": first,
        "peak_bytes": max(peaks),
        "saved_bytes": saved,
    }


def last_logits(model: ToSTLM, ids: torch.Tensor) -> torch.Tensor:
    """The next-token logits (B, V) after `ids` (B, T) by the parallel forward over the whole
    prefix, as CausalLM.forward computes it, but with the head applied to the last position only
    (all a generator needs)."""
    x = model.embed(ids)
    for block in model.blocks:
        x = block(x)
    return model.lm_head(model.ln_f(x[:, -1]))


def median_seconds(fn: Callable[[], object], device: str, repeats: int) -> tuple[float, object]:
    """fn() once as a warmup, then the median of `repeats` timed calls; and the last call's result."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def measure_generation(
    positions: list[int], layers: int, width: int, heads: int, device: str, precision: str, repeats: int
) -> dict:
    """Seconds per new token at each position: recurrent `step` vs the parallel forward over the
    prefix; plus how far their logits differ at the last position. And the time to first token
    after a prompt of the largest position: read by `step`, token by token, vs by `prefill`."""
    torch.manual_seed(0)
    last = max(positions)
    cfg = ModelConfig(n_layer=layers, n_embd=width, n_head=heads, seq_len=last, vocab_size=GEN_VOCAB, bias=False)
    model = ToSTLM(cfg).to(device).eval()
    ids = torch.randint(0, GEN_VOCAB, (1, last), device=device)
    step_seconds = []
    with torch.no_grad(), autocast(device, precision):
        model.step(ids[:, 0], model.init_states(1))  # warmup: first-call costs stay out of the timings
        sync(device)
        loop_start = time.perf_counter()
        states = model.init_states(1)
        for t in range(last):  # the token at position t + 1 (1-based), reading the state of t tokens
            start = time.perf_counter()
            step_logits = model.step(ids[:, t], states)
            sync(device)
            step_seconds.append(time.perf_counter() - start)
        stepped_seconds = time.perf_counter() - loop_start
        if device == "cuda":  # again without the synchronize after every step, as generate ran
            loop_start = time.perf_counter()
            states = model.init_states(1)
            for t in range(last):
                step_logits = model.step(ids[:, t], states)
            sync(device)
            stepped_seconds = time.perf_counter() - loop_start
        state_bytes = sum(s.S.nbytes + s.M.nbytes + s.P.nbytes for s in states)
        prefix = {}
        for pos in positions:
            prefix[pos], prefix_out = median_seconds(lambda pos=pos: last_logits(model, ids[:, :pos]), device, repeats)
        prefill_seconds, (prefill_logits, _states) = median_seconds(lambda: model.prefill(ids), device, repeats)
    diff = (step_logits.float() - prefix_out.float()).abs().max().item()
    scale = prefix_out.float().abs().max().item()
    recurrent = {pos: statistics.median(step_seconds[max(0, pos - STEP_WINDOW) : pos]) for pos in positions}
    return {
        "recurrent_seconds": recurrent,
        "prefix_seconds": prefix,
        "state_bytes": state_bytes,
        "last_logits_max_abs_diff": diff,
        "last_logits_max_abs": scale,
        "tssa_impl": resolve_impl(cfg.tssa_impl, torch.device(device)),
        "first_token": {
            "prompt_tokens": last,
            "step_seconds": stepped_seconds,
            "prefill_seconds": prefill_seconds,
            "logits_max_abs_diff": (step_logits.float() - prefill_logits.float()).abs().max().item(),
            "logits_max_abs": prefill_logits.float().abs().max().item(),
        },
    }


def busy_cpu_seconds() -> float:
    """CPU seconds all processes of the machine have used since boot (/proc/stat: user, nice,
    system, irq, softirq, steal); 0 where there is no /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def sdpa_kernel(width: int, heads: int, device: str, precision: str, document_tokens: int | None = None) -> str | None:
    """The aten kernel F.scaled_dot_product_attention picks here for the causal layer, forward
    and backward (flash kernels never store the N x N scores; the math one does); with
    document_tokens, for the layer given document_ids (a boolean attn_mask)."""
    from torch.profiler import ProfilerActivity, profile

    layer = SelfAttention(layer_config(width, heads, 256), causal=True, n_tokens=256).to(device)
    x = torch.randn(1, 256, width, device=device, requires_grad=True)
    masking = {} if document_tokens is None else {"document_ids": random_documents(256, document_tokens).to(device)}
    with profile(activities=[ProfilerActivity.CPU]) as prof:  # the aten ops are CPU events; no CUPTI needed
        with autocast(device, precision):
            y = layer(x, **masking)
        y.float().sum().backward()
        sync(device)
    names = [
        e.key
        for e in prof.key_averages()
        if e.key.startswith("aten::_scaled_dot_product")
        or e.key.startswith("aten::_efficient_attention")
        or e.key.startswith("aten::_flash_attention")
    ]
    return ", ".join(sorted({n.removeprefix("aten::") for n in names})) or None


def wait_for_quiet(max_wait_s: float) -> float:
    """Wait (up to max_wait_s) until the machine's cores are at most RETRY_OTHER_LOAD busy over
    a QUIET_WINDOW_S window, as other processes on a shared machine come and go; returns the
    seconds waited."""
    start = time.perf_counter()
    while True:
        busy = busy_cpu_seconds()
        time.sleep(QUIET_WINDOW_S)
        load = (busy_cpu_seconds() - busy) / (QUIET_WINDOW_S * (os.cpu_count() or 1))
        waited = time.perf_counter() - start
        if load <= RETRY_OTHER_LOAD or waited >= max_wait_s:
            return waited


def _noop() -> dict:
    return {}


def _worker(conn, fn_name: str, kwargs: dict) -> None:
    try:
        result = globals()[fn_name](**kwargs)
        result["worker_cpu_seconds"] = time.process_time()  # the whole (forked, so fresh) process's CPU time
        conn.send(("ok", result))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which marks the case failed
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


class Runner:
    """Runs a measuring function in a fresh process on CPU (so that no case inherits another's
    peak RSS or allocator state), in this process on GPU (whose peak counter resets)."""

    def __init__(self, device: str, quiet_wait_s: float = 0.0) -> None:
        self.device, self.quiet_wait_s = device, quiet_wait_s
        if device == "cpu":
            self.ctx = mp.get_context("forkserver")
            self.ctx.set_forkserver_preload(["__main__", "torch", "pretrain.models.tost"])
            from multiprocessing import forkserver

            forkserver.ensure_running()
            self._run_in_worker("_noop", {})  # waits for the server's imports, not to charge them to a case

    def __call__(self, fn_name: str, **kwargs) -> tuple[str, object]:
        """(status, result); on CPU the result gets `other_load`: the share of the machine's cores
        that other processes kept busy (or stole) while the worker ran, which slows the case."""
        if self.device == "cpu":
            best = None
            for attempt in range(1 + RETRIES):
                waited = wait_for_quiet(self.quiet_wait_s)
                self.quiet_wait_s = max(0.0, self.quiet_wait_s - waited)
                if waited > 1:
                    print(f"  waited {waited:.0f} s for other processes to leave the cores", file=sys.stderr)
                busy, start = busy_cpu_seconds(), time.perf_counter()
                status, result = self._run_in_worker(fn_name, kwargs)
                wall, busy = time.perf_counter() - start, busy_cpu_seconds() - busy
                if status != "ok":
                    return status, result
                other = max(0.0, busy - result.pop("worker_cpu_seconds"))
                result["other_load"] = min(1.0, other / (wall * (os.cpu_count() or 1)))
                result["attempts"] = attempt + 1
                if best is None or result["other_load"] < best["other_load"]:
                    best = result
                if result["other_load"] <= RETRY_OTHER_LOAD:
                    break
                print(
                    f"  other processes kept {result['other_load']:.0%} of the cores busy"
                    + ("; measuring again" if attempt < RETRIES else ""),
                    file=sys.stderr,
                )
            return "ok", best
        try:
            return "ok", globals()[fn_name](**kwargs)
        except torch.cuda.OutOfMemoryError as exc:
            status, result = "error", f"CUDA out of memory: {str(exc).splitlines()[0]}"
        except Exception as exc:  # noqa: BLE001 - the case is marked failed, as a worker's would be
            status, result = "error", f"{type(exc).__name__}: {exc}"
        # Past the except clause, whose exception held the failed case's frames and so its tensors:
        # give their memory back to the device, so that the next case is not measured beside it.
        gc.collect()
        torch.cuda.empty_cache()
        return status, result

    def _run_in_worker(self, fn_name: str, kwargs: dict) -> tuple[str, object]:
        parent, child = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=_worker, args=(child, fn_name, kwargs))
        proc.start()
        child.close()
        try:
            status, result = parent.recv()
        except EOFError:
            status, result = "error", "the worker process died"
        proc.join()
        if proc.exitcode and status == "ok":
            status, result = "error", f"the worker exited with code {proc.exitcode}"
        elif proc.exitcode and proc.exitcode < 0:
            result += f" (signal {-proc.exitcode}{', likely out of memory' if -proc.exitcode == 9 else ''})"
        return status, result


# ----------------------------------------------------------------------------------------------
# Fits and the run


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log(y) against log(x); None under 2 points."""
    if len(xs) < 2:
        return None
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def extrapolate(points: list[tuple[int, float]], n: int) -> float | None:
    """y at n from the last two measured (n, y), assuming at least linear growth."""
    if not points:
        return None
    if len(points) == 1:
        ((n0, y0),) = points
        return y0 * n / n0
    (n0, y0), (n1, y1) = points[-2:]
    exponent = max(1.0, math.log(max(y1, 1e-12) / max(y0, 1e-12)) / math.log(n1 / n0))
    return y1 * (n / n1) ** exponent


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def measured_case(out: dict) -> dict:
    """A case's report fields from what measure_layer returned."""
    case = {
        "status": "ok",
        "ms": round(out["seconds"] * 1e3, 4),
        "ms_repetitions": [round(t * 1e3, 4) for t in out["seconds_all"]],
        "passes_per_repetition": out["passes_per_repetition"],
        "peak_mib": round(out["peak_bytes"] / MiB, 2),
        "saved_mib": round(out["saved_bytes"] / MiB, 3),
        "saved_bytes": out["saved_bytes"],
    }
    if "other_load" in out:
        case.update(other_load=round(out["other_load"], 3), attempts=out["attempts"])
    return case


def layer_case(
    runner: Runner, args: argparse.Namespace, variant: str, n: int, document_tokens: int | None = None
) -> tuple[str, object]:
    """`measure_layer` of one variant at n tokens in a fresh process, with the command line's sizes."""
    return runner(
        "measure_layer",
        variant=variant,
        n=n,
        width=args.width,
        heads=args.heads,
        device=args.device,
        precision=args.precision,
        repeats=args.repeats,
        document_tokens=document_tokens,
    )


def run_document_mask(args: argparse.Namespace, runner: Runner) -> dict:
    """Per causal layer, at the one length args.tokens[0], a case without and one with document_ids;
    masked time over unmasked time."""
    n = args.tokens[0]
    layers = {}
    for variant in args.variants:
        label = VARIANTS[variant][0]
        cases = {}
        for masked in (False, True):
            status, out = layer_case(runner, args, variant, n, args.document_tokens if masked else None)
            cases["masked" if masked else "unmasked"] = (
                measured_case(out) if status == "ok" else {"status": "failed", "reason": out}
            )
            case = cases["masked" if masked else "unmasked"]
            print(
                f"{label} {n}{' with document_ids' if masked else ''}: "
                + (f"{case['ms']:.2f} ms, {case['peak_mib']:.1f} MiB peak" if status == "ok" else f"failed: {out}"),
                file=sys.stderr,
            )
        ok = all(c["status"] == "ok" for c in cases.values())
        cost = cases["masked"]["ms"] / cases["unmasked"]["ms"] if ok else None
        layers[variant] = {"label": label, **cases, "masked_over_unmasked": rounded(cost)}
    documents = random_documents(n, args.document_tokens)
    return {
        "tokens": n,
        "documents": int(documents.max()) + 1,
        "mean_document_tokens": args.document_tokens,
        "layers": layers,
    }


def document_mask_section(report: dict, args: argparse.Namespace, command: str) -> tuple[str, str]:
    mode = "gpu" if report["device_kind"] == "cuda" else "cpu"
    mask = report["document_mask"]

    def cell(case: dict, key: str) -> str:
        return f"{case[key]:,.1f}" if case["status"] == "ok" else case["status"]

    rows = [
        f"| {res['label']} | {cell(res['unmasked'], 'ms')} | {cell(res['masked'], 'ms')} | "
        f"{fmt_ratio(res['masked_over_unmasked'])} | {cell(res['unmasked'], 'peak_mib')} | "
        f"{cell(res['masked'], 'peak_mib')} |"
        for res in mask["layers"].values()
    ]
    lines = [
        heading(f"Document masking, {mode}, {report['precision']}", report["device"]),
        "",
        f"`{command}`",
        "",
        f"Forward + backward of one causal layer (as in the attention scaling section: batch 1, width "
        f"{report['width']}, {report['heads']} heads, {report['precision']}, median of {args.repeats} timed "
        f"repetitions after a warmup pass, peak memory of a pass) at {mask['tokens']:,} tokens, without and with "
        f"`document_ids`: {mask['documents']} packed documents of random lengths (1 + exponential, mean "
        f"{mask['mean_document_tokens']} tokens, seed 0). TSSA's prefix sums restart at each document (the fused "
        "op overwrites its chunked cumsums on the documents that start inside a chunk); SDPA gets a boolean "
        f"block-diagonal causal mask (it ran `{report['sdpa_kernel']}` unmasked, `{report['sdpa_kernel_masked']}` "
        "masked). "
        f"torch {report['torch']}{cuda_version(report)}, {report['threads']} CPU threads; "
        f"total run {report['total_seconds']:.0f} s."
        + (
            f" The machine is shared: other processes kept {report['other_load']['mean']:.0%} of its cores busy on "
            f"average while the cases ran (at most {report['other_load']['max']:.0%})."
            if report.get("other_load")
            else ""
        ),
        "",
        "| layer | unmasked, ms | masked, ms | masked / unmasked | unmasked peak, MiB | masked peak, MiB |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ]
    return f"attention document mask {mode} {report['precision']} | {report['device']}", "\n".join(lines)


def run_layers(args: argparse.Namespace, runner: Runner) -> dict:
    results = {}
    for variant in args.variants:
        label, _kind, impl = VARIANTS[variant]
        cases, timed, mem = [], [], []
        for n in args.tokens:
            case = {"tokens": n}
            # warmup, calibration, repetitions (>= 1 pass each), memory passes, the saved-bytes forward
            passes = 2 + args.repeats + MEMORY_PASSES + 1
            time_guess, mem_guess = extrapolate(timed, n), extrapolate(mem, n)
            if cases and cases[-1]["status"] != "ok":
                case.update(status="skipped", reason=f"{cases[-1]['tokens']} tokens were not measured")
            elif mem_guess is not None and mem_guess / 2**30 > args.memory_limit_gib:
                case.update(
                    status="skipped",
                    reason=f"would need ~{mem_guess / 2**30:.1f} GiB, over "
                    f"--memory-limit-gib {args.memory_limit_gib:.1f}",
                )
            elif time_guess is not None and time_guess * passes > args.max_case_seconds:
                case.update(
                    status="skipped",
                    reason=f"would take ~{time_guess * passes:.0f} s, over "
                    f"--max-case-seconds {args.max_case_seconds:.0f}",
                )
            else:
                start = time.perf_counter()
                status, out = layer_case(runner, args, variant, n)
                if status == "ok":
                    case.update(measured_case(out))
                    timed.append((n, out["seconds"]))
                    mem.append((n, max(out["peak_bytes"], 1)))
                else:
                    case.update(status="failed", reason=out)
                load = f", other load {case['other_load']:.0%}" if "other_load" in case else ""
                print(
                    f"{label} {n}: "
                    + (
                        f"{case['ms']:.2f} ms, {case['peak_mib']:.1f} MiB peak, {case['saved_mib']:.1f} MiB saved{load}"
                        if status == "ok"
                        else f"failed: {out}"
                    )
                    + f" ({time.perf_counter() - start:.1f} s)",
                    file=sys.stderr,
                )
            if case["status"] == "skipped":
                print(f"{label} {n}: skipped, {case['reason']}", file=sys.stderr)
            cases.append(case)
        ok = [c for c in cases if c["status"] == "ok"]
        big = [c for c in ok if c["tokens"] >= FIT_FROM_TOKENS]
        exponents = {
            "time": slope([c["tokens"] for c in ok], [c["ms"] for c in ok]),
            "time_from_4k": slope([c["tokens"] for c in big], [c["ms"] for c in big]),
            "memory": slope([c["tokens"] for c in ok], [max(c["peak_mib"], 1e-3) for c in ok]),
            "memory_from_4k": slope([c["tokens"] for c in big], [max(c["peak_mib"], 1e-3) for c in big]),
        }
        results[variant] = {
            "label": label,
            "tssa_impl": impl,
            "cases": cases,
            "exponents": {k: rounded(v) for k, v in exponents.items()},
        }
    return results


def targets(layers: dict) -> dict:
    """At TARGET_TOKENS (or the measured length nearest it), per form: each TSSA implementation's
    time over eager TSSA's and over SDPA's and its saved bytes over SDPA's; and every layer's time
    exponent from FIT_FROM_TOKENS up. None where a case was not measured."""
    measured = sorted({c["tokens"] for res in layers.values() for c in res["cases"] if c["status"] == "ok"})
    n = min(measured, key=lambda m: (abs(math.log(m / TARGET_TOKENS)), -m)) if measured else None
    out = {"tokens": n}

    def case(variant: str) -> dict | None:
        if variant not in layers or n is None:
            return None
        found = [c for c in layers[variant]["cases"] if c["tokens"] == n and c["status"] == "ok"]
        return found[0] if found else None

    def ratio(a: dict | None, b: dict | None, key: str) -> float | None:
        return rounded(a[key] / b[key], 4) if a and b and b[key] > 0 else None

    for form, (eager, sdpa, impls) in FORMS.items():
        entry = {}
        core = CORES[form]
        for impl, variant in impls.items():
            if variant in layers:
                entry[impl] = {
                    "time_over_eager": ratio(case(variant), case(eager), "ms"),
                    "core_time_over_eager": ratio(case(f"{core}_{impl}"), case(f"{core}_eager"), "ms"),
                    "time_over_sdpa": ratio(case(variant), case(sdpa), "ms"),
                    "saved_over_sdpa": ratio(case(variant), case(sdpa), "saved_bytes"),
                }
        if "fused" not in entry:
            entry["fused"] = dict.fromkeys(
                ("time_over_eager", "core_time_over_eager", "time_over_sdpa", "saved_over_sdpa")
            )
        names = {"eager": eager, **{impl: v for impl, v in impls.items() if impl in entry}, "sdpa": sdpa}
        entry["time_exponent_from_4k"] = {
            impl: layers[v]["exponents"]["time_from_4k"] if v in layers else None for impl, v in names.items()
        }
        out[form] = entry
    return out


def run_generation(args: argparse.Namespace, runner: Runner) -> dict | None:
    if not args.positions:
        return None
    start = time.perf_counter()
    status, out = runner(
        "measure_generation",
        positions=args.positions,
        layers=args.gen_layers,
        width=args.width,
        heads=args.heads,
        device=args.device,
        precision=args.precision,
        repeats=args.repeats,
    )
    if status != "ok":
        print(f"generation failed: {out}", file=sys.stderr)
        return {"status": "failed", "reason": out}
    rows = [
        {
            "position": pos,
            "recurrent_ms": round(out["recurrent_seconds"][pos] * 1e3, 4),
            "prefix_ms": round(out["prefix_seconds"][pos] * 1e3, 4),
        }
        for pos in args.positions
    ]
    for row in rows:
        print(
            f"generation at {row['position']}: recurrent {row['recurrent_ms']:.2f} ms/token, "
            f"prefix re-run {row['prefix_ms']:.2f} ms/token",
            file=sys.stderr,
        )
    first = out["first_token"]
    first_token = {
        "prompt_tokens": first["prompt_tokens"],
        "step_ms": round(first["step_seconds"] * 1e3, 3),
        "prefill_ms": round(first["prefill_seconds"] * 1e3, 3),
        "step_over_prefill": round(first["step_seconds"] / first["prefill_seconds"], 2),
        "logits_max_abs_diff": first["logits_max_abs_diff"],
        "logits_max_abs": first["logits_max_abs"],
    }
    print(
        f"first token after {first_token['prompt_tokens']} prompt tokens: step by step {first_token['step_ms']:.1f} "
        f"ms, prefill {first_token['prefill_ms']:.1f} ms ({first_token['step_over_prefill']:.1f}x), logits differ "
        f"by {first_token['logits_max_abs_diff']:.2e}",
        file=sys.stderr,
    )
    print(f"generation done ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    positions = [r["position"] for r in rows]
    return {
        "status": "ok",
        "layers": args.gen_layers,
        "vocab_size": GEN_VOCAB,
        "tssa_impl": out["tssa_impl"],
        "step_window": STEP_WINDOW,
        "rows": rows,
        "state_bytes": out["state_bytes"],
        "other_load": round(out.get("other_load", 0.0), 3),
        "last_logits_max_abs_diff": out["last_logits_max_abs_diff"],
        "last_logits_max_abs": out["last_logits_max_abs"],
        "first_token": first_token,
        "exponents": {
            name: round(slope(positions, [r[f"{name}_ms"] for r in rows]), 3) if len(rows) > 1 else None
            for name in ("recurrent", "prefix")
        },
    }


# ----------------------------------------------------------------------------------------------
# Output


def cuda_version(report: dict) -> str:
    return f", CUDA {report['cuda']}" if report.get("cuda") else ""


def fmt_exp(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


IMPL_COLORS = {"eager": "tab:blue", "fused": "tab:green", "triton": "tab:purple", None: "tab:red"}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gen = report["generation"]
    panels = 3 if gen and gen["status"] == "ok" else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.6 * panels, 4.8))
    for variant, res in report["layers"].items():
        ok = [c for c in res["cases"] if c["status"] == "ok"]
        if not ok:
            continue
        color = IMPL_COLORS[res["tssa_impl"]]
        style = "--s" if VARIANTS[variant][1].endswith("causal") else "-o"
        n = [c["tokens"] for c in ok]
        e = res["exponents"]
        axes[0].plot(
            n,
            [c["ms"] for c in ok],
            style,
            color=color,
            markersize=4,
            label=f"{res['label']}: N^{fmt_exp(e['time'])}"
            + ("" if e["time_from_4k"] is None else f" (>= 4k: N^{fmt_exp(e['time_from_4k'])})"),
        )
        axes[1].plot(
            n,
            [c["peak_mib"] for c in ok],
            style,
            color=color,
            markersize=4,
            label=f"{res['label']}: N^{fmt_exp(e['memory'])}",
        )
    title = f"one layer, D={report['width']}, {report['heads']} heads, {report['precision']}, batch 1"
    axes[0].set(xlabel="tokens N", ylabel="forward + backward, ms", title=f"time: {title}")
    axes[1].set(xlabel="tokens N", ylabel="peak memory of a pass, MiB", title="memory")
    if panels == 3:
        pos = [r["position"] for r in gen["rows"]]
        axes[2].plot(
            pos,
            [r["recurrent_ms"] for r in gen["rows"]],
            "-o",
            color="tab:blue",
            label=f"recurrent step: T^{fmt_exp(gen['exponents']['recurrent'])}",
        )
        axes[2].plot(
            pos,
            [r["prefix_ms"] for r in gen["rows"]],
            "--s",
            color="tab:gray",
            label=f"prefix re-run: T^{fmt_exp(gen['exponents']['prefix'])}",
        )
        axes[2].set(xlabel="position T", ylabel="ms per new token", title=f"ToSTLM generation, {gen['layers']} layers")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6.5)
        ax.title.set_fontsize(9)
    fig.suptitle(f"{report['device']}, torch {report['torch']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cell(case: dict, key: str, digits: int) -> str:
    return f"{case[key]:,.{digits}f}" if case["status"] == "ok" else case["status"]


def targets_lines(report: dict) -> list[str]:
    tg, layers = report["targets"], report["layers"]
    if tg["tokens"] is None:
        return ["Targets: no case was measured.", ""]
    rows = []
    for form, (_eager, _sdpa, impls) in FORMS.items():
        entry = tg[form]
        exps = entry["time_exponent_from_4k"]
        for impl, variant in impls.items():
            if impl not in entry:
                continue
            r = entry[impl]
            rows.append(
                f"| {VARIANTS[variant][0]} | {fmt_ratio(r['core_time_over_eager'])} "
                f"| {fmt_ratio(r['time_over_eager'])} | {fmt_ratio(r['time_over_sdpa'])} "
                f"| {fmt_ratio(r['saved_over_sdpa'])} | {fmt_exp(exps[impl])} | {fmt_exp(exps['eager'])} "
                f"| {fmt_exp(exps['sdpa'])} |"
            )
    needed = [v for eager, sdpa, impls in FORMS.values() for v in (eager, sdpa, impls["fused"])]
    absent = [VARIANTS[v][0] for v in needed if v not in layers]
    return [
        f"Targets at {tg['tokens']:,} tokens"
        + ("" if tg["tokens"] == TARGET_TOKENS else f" (the measured length nearest {TARGET_TOKENS:,})")
        + ": forward + backward time of each TSSA implementation's core (the statistics alone, no "
        "projections) over eager's core, and of its layer over eager TSSA's layer and over the softmax "
        "layer's of the same form (causal or not), its bytes saved for backward over the softmax layer's, "
        f"and the time exponents over the lengths from {FIT_FROM_TOKENS:,} up (- where a case or a fit is "
        "missing" + (f"; not run: {', '.join(absent)}" if absent else "") + "):",
        "",
        "| layer | core time / eager's | time / eager's | time / SDPA's | saved / SDPA's | time exponent, >= 4k "
        "| eager's | SDPA's |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ]


def markdown_section(report: dict, args: argparse.Namespace, command: str) -> tuple[str, str]:
    mode = "gpu" if report["device_kind"] == "cuda" else "cpu"
    layers = report["layers"]
    names = list(layers)
    head = "| tokens | " + " | ".join(layers[v]["label"] for v in names) + " |"
    rule = "|---:|" + "---:|" * len(names)

    def table(key: str, digits: int) -> list[str]:
        return [
            f"| {n:,} | " + " | ".join(cell(layers[v]["cases"][i], key, digits) for v in names) + " |"
            for i, n in enumerate(report["tokens"])
        ]

    exp_rows = [
        f"| {res['label']} | {fmt_exp(res['exponents']['time'])} | {fmt_exp(res['exponents']['time_from_4k'])} "
        f"| {fmt_exp(res['exponents']['memory'])} | {fmt_exp(res['exponents']['memory_from_4k'])} |"
        for res in layers.values()
    ]
    skipped = [
        f"- {res['label']}, {c['tokens']:,} tokens: {c['status']}, {c['reason']}"
        for res in layers.values()
        for c in res["cases"]
        if c["status"] != "ok"
    ]
    gpu, bf16 = report["device_kind"] == "cuda", report["precision"] == "bf16"
    about = [
        "Forward + backward of one token-mixing layer (loss = output.sum(); gradients for the input and all "
        "weights, zeroed before every pass), batch 1, random inputs. "
        + IMPLS_HOW
        + ("; and triton (GPU kernels of the same chunked computation)." if gpu else "; triton needs a GPU.")
        + f" Time: median over the repetitions, each a loop of passes lasting at least "
        f"{MIN_REPETITION_S * 1e3:.0f} ms, after one warmup pass.",
        "",
        f"Memory: {MEMORY_HOW[report['device_kind']]}",
        "",
        "Saved for backward: the bytes of the tensors autograd keeps from one forward for the backward, from one "
        "more forward after the timed and memory passes, under `torch.autograd.graph.saved_tensors_hooks`: each "
        "distinct storage the pack hook sees counted once (a view shares its base's storage), the layer's own "
        "parameters not counted, its input counted (both kinds of layer keep it for the first projection's weight "
        "gradient"
        + ("; under bf16 autocast, the bf16 copies of the input and of the weights that autocast makes" if bf16 else "")
        + "). It depends on the code alone, not on the machine's load.",
        "",
        "The exponent is the least-squares slope of log(time) or log(memory) against log(tokens) over every "
        f'measured length ("all"), and over the measured lengths from {FIT_FROM_TOKENS:,} tokens up (">= 4k"), '
        "where fixed per-pass costs matter least: 1 is linear, 2 quadratic.",
    ]
    lines = [
        heading(f"Attention scaling, {mode}, {report['precision']}", report["device"]),
        "",
        f"`{command}`",
        "",
        *about,
        "",
        f"torch {report['torch']}{cuda_version(report)}, {report['threads']} CPU threads; "
        f"width D {report['width']}, {report['heads']} heads "
        f"(head dim {report['width'] // report['heads']}), {report['precision']}; 1 warmup pass + {args.repeats} "
        f"timed repetitions per case; --memory-limit-gib {report['memory_limit_gib']:.1f}, --max-case-seconds "
        f"{args.max_case_seconds:.0f}. Total run {report['total_seconds']:.0f} s. `SelfAttention`'s SDPA ran "
        f"`{report['sdpa_kernel']}`"
        + (
            ", which never stores the N x N scores: the softmax layers' memory grows linearly like TSSA's, "
            "only their time quadratically."
            if report["sdpa_kernel"] and "math" not in report["sdpa_kernel"]
            else "."
        ),
        "",
        *(
            [
                f"The machine is shared: while the cases ran, other processes kept "
                f"{report['other_load']['mean']:.0%} of its cores busy on average (from /proc/stat, less the case's "
                f"own CPU time), at most {report['other_load']['max']:.0%} ({report['other_load']['max_case']}); "
                f"a case above {RETRY_OTHER_LOAD:.0%} was measured again (after waiting for the cores to be free, "
                f"up to --quiet-wait seconds in all), "
                f"up to {1 + RETRIES} times, and its least disturbed measurement kept"
                + (
                    "; still disturbed: "
                    + "; ".join(f"{name} ({load:.0%})" for load, name in report["other_load"]["disturbed"])
                    if report["other_load"]["disturbed"]
                    else ""
                )
                + ".",
                "",
            ]
            if "other_load" in report
            else []
        ),
        "Forward + backward, ms (median):",
        "",
        head,
        rule,
        *table("ms", 2),
        "",
        "Peak memory of one forward + backward above what was allocated before it, MiB:",
        "",
        head,
        rule,
        *table("peak_mib", 1),
        "",
        "Saved for backward by one forward (distinct storages, the layer's parameters excepted), MiB:",
        "",
        head,
        rule,
        *table("saved_mib", 1),
        "",
        "Measured scaling exponents (slope of log-log least squares):",
        "",
        "| layer | time, all | time, >= 4k | memory, all | memory, >= 4k |",
        "|---|---:|---:|---:|---:|",
        *exp_rows,
        "",
        *targets_lines(report),
    ]
    lines += (
        [
            "Not measured (a case is skipped when its time or memory, extrapolated from the smaller lengths "
            "of the same layer, would pass --max-case-seconds or --memory-limit-gib):",
            "",
            *skipped,
            "",
        ]
        if skipped
        else ["Every case was measured: none was predicted to pass --max-case-seconds or --memory-limit-gib.", ""]
    )
    gen = report["generation"]
    if gen and gen["status"] == "ok":
        ft = gen["first_token"]
        lines += [
            f"Generation with a ToSTLM of {gen['layers']} layers (width {report['width']}, vocabulary "
            f"{gen['vocab_size']:,}, `model.tssa_impl` auto, here {gen['tssa_impl']}), batch 1, no gradients: time "
            "per new token at position T (the T-th token). "
            f"Recurrent: `ToSTLM.step` reading the TSSA state ({gen['state_bytes'] / 1024:.0f} KiB in all, whatever "
            f"T is), the median of the {gen['step_window']} steps up to T in one generation pass from position 1. "
            "Prefix re-run: the parallel forward over all T tokens for the same next-token logits (the head on the "
            f"last position only), median of {args.repeats} after a warmup; what a model with no recurrent form "
            "and no KV cache does for every token. At the last position the two give logits that differ by at "
            f"most {gen['last_logits_max_abs_diff']:.2e} (largest logit {gen['last_logits_max_abs']:.2f}).",
            "",
            "| position T | recurrent ms/token | prefix re-run ms/token | re-run / recurrent |",
            "|---:|---:|---:|---:|",
            *[
                f"| {r['position']:,} | {r['recurrent_ms']:.2f} | {r['prefix_ms']:.2f} | "
                f"{r['prefix_ms'] / r['recurrent_ms']:.1f}x |"
                for r in gen["rows"]
            ],
            "",
            f"Exponent of time per token against T: recurrent {fmt_exp(gen['exponents']['recurrent'])}, prefix re-run "
            f"{fmt_exp(gen['exponents']['prefix'])}.",
            "",
            f"Time to first token after a prompt of {ft['prompt_tokens']:,} tokens (no gradients), both ending in the "
            "next-token logits: the prompt read token by token, `ToSTLM.step` from `init_states(1)` (what "
            "`generate` did before; one pass"
            + (", without a synchronize between steps" if gpu else "")
            + f"), against one `ToSTLM.prefill(prompt)` (what it does now; median of {args.repeats} after a "
            f"warmup). Their logits differ by at most {ft['logits_max_abs_diff']:.2e} (largest logit "
            f"{ft['logits_max_abs']:.2f}).",
            "",
            "| prompt tokens | step by step, ms | prefill, ms | step by step / prefill |",
            "|---:|---:|---:|---:|",
            f"| {ft['prompt_tokens']:,} | {ft['step_ms']:,.1f} | {ft['prefill_ms']:,.1f} | "
            f"{ft['step_over_prefill']:.1f}x |",
            "",
        ]
    elif gen:
        lines += [f"Generation: failed, {gen['reason']}.", ""]
    if report.get("plot"):
        lines += [
            f"![attention scaling]({os.path.relpath(Path(report['plot']).resolve(), args.write_doc.resolve().parent)})",
            "",
        ]
    return f"attention {mode} {report['precision']} | {report['device']}", "\n".join(lines)


def other_load(loads: Iterable[tuple[float, str]]) -> dict | None:
    """The summary of the other processes' load over the cases: (load, case name) each."""
    loads = list(loads)
    if not loads:
        return None
    worst = max(loads)
    return {
        "mean": round(sum(v for v, _ in loads) / len(loads), 3),
        "max": worst[0],
        "max_case": worst[1],
        "disturbed": [(v, name) for v, name in loads if v > RETRY_OTHER_LOAD],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    runner = Runner(args.device, args.quiet_wait)
    report = {
        "device": device_name(),
        "device_kind": args.device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if args.device == "cuda" else None,
        "threads": torch.get_num_threads(),
        "width": args.width,
        "heads": args.heads,
        "precision": args.precision,
        "batch": 1,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "memory_limit_gib": round(args.memory_limit_gib, 2),
        "max_case_seconds": args.max_case_seconds,
        "memory_method": "peak RSS increase (VmHWM reset via /proc/self/clear_refs), fresh process per case"
        if args.device == "cpu"
        else "torch.cuda.max_memory_allocated increase",
        "saved_method": "distinct storages packed by saved_tensors_hooks in one forward, parameters excepted",
    }
    report["sdpa_kernel"] = sdpa_kernel(args.width, args.heads, args.device, args.precision)
    if args.only == "document-mask":
        report["sdpa_kernel_masked"] = sdpa_kernel(args.width, args.heads, args.device, args.precision, 64)
        report["document_mask"] = run_document_mask(args, runner)
        report["total_seconds"] = round(time.perf_counter() - start, 1)
        report["other_load"] = other_load(
            (case["other_load"], f"{res['label']}, {kind}")
            for res in report["document_mask"]["layers"].values()
            for kind in ("unmasked", "masked")
            if "other_load" in (case := res[kind])
        )
        publish(report, args.write_doc, lambda command: document_mask_section(report, args, command))
        return 0
    report["layers"] = run_layers(args, runner)
    report["targets"] = targets(report["layers"])
    report["generation"] = run_generation(args, runner)
    report["total_seconds"] = round(time.perf_counter() - start, 1)
    loads = [
        (c["other_load"], f"{res['label']}, {c['tokens']:,} tokens")
        for res in report["layers"].values()
        for c in res["cases"]
        if "other_load" in c
    ]
    if report["generation"] and "other_load" in report["generation"]:
        loads.append((report["generation"]["other_load"], "generation"))
    if loads:
        report["other_load"] = other_load(loads)
    if args.plot:
        plot(report, args.plot)
        report["plot"] = str(args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    publish(report, args.write_doc, lambda command: markdown_section(report, args, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
