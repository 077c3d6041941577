"""Benchmark one attention layer: TSSA vs softmax attention (SDPA) from 256 to 16k tokens, and
recurrent ToST generation vs re-running the prefix for every new token.

    python tools/bench/attention.py --write-doc docs/benchmarks.md         # GPU if torch finds one, else CPU
    python tools/bench/attention.py --device cpu --tokens 256 1k 4k --repeats 5

Layers: `TSSA` (non-causal, vision) and `CausalTSSA` against `SelfAttention` non-causal and causal
(F.scaled_dot_product_attention), built from one ModelConfig of the same width (CPU: D 384, 6
heads, fp32; GPU: D 768, 12 heads, bf16 autocast), batch 1. Per sequence length: the median
wall time of forward + backward (loss = output.sum(), gradients for the input and the weights)
after a warmup pass, and the peak memory of one such pass above what was allocated before it.
On CPU every case runs in a fresh process (forked from a server that has imported torch), whose
peak resident set size is reset through /proc/self/clear_refs just before the measured pass; on
GPU, torch.cuda.max_memory_allocated after reset_peak_memory_stats. A case whose time or memory,
extrapolated from the smaller lengths of the same layer, would pass --max-case-seconds or
--memory-limit-gib is skipped and marked so, not run. Scaling exponents are least-squares
slopes of log(time) and log(memory) against log(tokens).

Generation: a small ToSTLM (4 layers of the same width). Time per new token at each position of
the recurrent `step` (O(D) state per layer), against running the parallel forward over the whole
prefix to get the same next-token logits, which is what a model without a recurrent form (and
without a KV cache) does per token; slopes of log(time per token) against log(position).

Writes a log-log plot (--plot, default docs/attention_scaling.png). One JSON object goes to
stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import multiprocessing as mp
import os
import re
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from common import add_write_doc_flag, device_name, heading, publish

from pretrain.config import ModelConfig
from pretrain.models.attention import SelfAttention
from pretrain.models.tost import TSSA, CausalTSSA, ToSTLM

VARIANTS = {  # name -> (label, layer builder)
    "tssa": ("TSSA", lambda cfg, n: TSSA(cfg)),
    "tssa_causal": ("causal TSSA", lambda cfg, n: CausalTSSA(cfg)),
    "softmax": ("softmax (SDPA)", lambda cfg, n: SelfAttention(cfg, causal=False, n_tokens=n)),
    "softmax_causal": ("causal softmax (SDPA)", lambda cfg, n: SelfAttention(cfg, causal=True, n_tokens=n)),
}
# Per device: (width, heads, precision).
DEVICE_DEFAULTS = {"cpu": (384, 6, "fp32"), "cuda": (768, 12, "bf16")}
DEFAULT_TOKENS = [256, 512, 1024, 2048, 4096, 8192, 16384]
DEFAULT_POSITIONS = [128, 256, 512, 1024, 2048, 4096]
GEN_LAYERS = 4
GEN_VOCAB = 50304
STEP_WINDOW = 16  # recurrent steps whose median is the time per token at a position
MIN_REPETITION_S = 0.05  # a repetition loops over passes until it lasts about this long
MEMORY_PASSES = 2  # peak memory is the largest of this many measured passes
LARGE_N_POINTS = 3  # the "large N" exponent fits the largest this many measured lengths
MiB = 2**20
# On CPU a case is measured again (once) when other processes kept more than this share of the
# cores busy while it ran: the project's machines are shared, and a busy core slows every case.
RETRY_OTHER_LOAD = 0.2
RETRIES = 2
QUIET_WINDOW_S = 0.3  # before a case, the machine's load is sampled over windows this long
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter

ABOUT = """Forward + backward of one token-mixing layer (loss = output.sum(); gradients for the input and
all weights, zeroed before every pass), batch 1, random inputs. Time: median over the repetitions,
each a loop of passes lasting at least {min_rep_ms:.0f} ms, after one warmup pass.

Memory: {memory}

The exponent is the least-squares slope of log(time) or log(memory) against log(tokens) over every
measured length ("all"), and over the largest {large} measured lengths ("large N"), where fixed
per-pass costs matter least: 1 is linear, 2 quadratic."""
MEMORY_HOW = {
    "cpu": "on CPU each case runs in a fresh process (forked from a server that imported torch "
    "once); after the timed passes glibc's mmap threshold is fixed at 64 KiB and the heap trimmed, "
    "so that freed buffers leave the resident set, the kernel's peak RSS is reset through "
    "`/proc/self/clear_refs`, and memory is the peak RSS during a pass minus the RSS just before it "
    f"(the largest of {MEMORY_PASSES} passes).",
    "cuda": "`torch.cuda.max_memory_allocated` during a pass (after `reset_peak_memory_stats`) minus "
    f"`memory_allocated` just before it (the largest of {MEMORY_PASSES} passes).",
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to run (default: auto, the GPU when torch finds one)",
    )
    p.add_argument("--width", type=int, help="model width D (default: 384 on CPU, 768 on GPU)")
    p.add_argument("--heads", type=int, help="heads K (default: 6 on CPU, 12 on GPU)")
    p.add_argument(
        "--precision", choices=("fp32", "bf16"), help="fp32, or bf16 autocast (default: fp32 on CPU, bf16 on GPU)"
    )
    p.add_argument(
        "--tokens",
        type=token_count,
        nargs="+",
        default=DEFAULT_TOKENS,
        metavar="N",
        help="sequence lengths, e.g. 256 1k 16k (default: 256 512 1k 2k 4k 8k 16k)",
    )
    p.add_argument("--max-tokens", type=token_count, help="drop the --tokens above this")
    p.add_argument(
        "--variants",
        nargs="+",
        choices=sorted(VARIANTS),
        default=list(VARIANTS),
        help="layers to measure (default: all four)",
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
        help="skip a case whose extrapolated run (warmup, repetitions, memory passes) would take "
        "longer than this (default: 120)",
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
        help="generation positions (default: 128 256 512 1k 2k 4k); 0 positions skips generation",
    )
    p.add_argument("--gen-layers", type=int, default=GEN_LAYERS, help="layers of the generation ToSTLM (default: 4)")
    p.add_argument(
        "--plot",
        type=Path,
        default=Path("docs/attention_scaling.png"),
        help="log-log plot to write (default: docs/attention_scaling.png)",
    )
    add_write_doc_flag(p)
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda needs a CUDA GPU and torch finds none")
    width, heads, precision = DEVICE_DEFAULTS[args.device]
    args.width = args.width or width
    args.heads = args.heads or heads
    args.precision = args.precision or precision
    if args.width % args.heads:
        p.error(f"--width {args.width} is not a multiple of --heads {args.heads}")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    args.tokens = sorted({n for n in args.tokens if args.max_tokens is None or n <= args.max_tokens})
    if not args.tokens:
        p.error("no --tokens left at or below --max-tokens")
    args.positions = sorted(set(args.positions))
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


def layer_config(width: int, heads: int, seq_len: int) -> ModelConfig:
    return ModelConfig(n_embd=width, n_head=heads, seq_len=seq_len, bias=False, dropout=0.0)


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


def measure_layer(variant: str, n: int, width: int, heads: int, device: str, precision: str, repeats: int) -> dict:
    """Forward + backward of one layer on (1, n, width): median seconds per pass and peak bytes."""
    torch.manual_seed(0)
    layer = VARIANTS[variant][1](layer_config(width, heads, n), n).to(device)
    x = torch.randn(1, n, width, device=device, requires_grad=True)

    def one_pass() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        with autocast(device, precision):
            y = layer(x)
        y.float().sum().backward()

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
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            one_pass()
            sync(device)
            peaks.append(torch.cuda.max_memory_allocated() - base)
    else:
        PeakRSS.release_freed_buffers()
        for _ in range(MEMORY_PASSES):
            base = PeakRSS.reset()
            one_pass()
            peaks.append(PeakRSS.peak() - base)
    return {
        "seconds": statistics.median(times),
        "seconds_all": times,
        "passes_per_repetition": inner,
        "warmup_seconds": first,
        "peak_bytes": max(peaks),
    }


def last_logits(model: ToSTLM, ids: torch.Tensor) -> torch.Tensor:
    """The next-token logits (B, V) after `ids` (B, T) by the parallel forward over the whole
    prefix, as CausalLM.forward computes it, but with the head applied to the last position only
    (all a generator needs)."""
    x = model.wte(ids) + model.wpe(torch.arange(ids.shape[1], device=ids.device))
    for block in model.blocks:
        x = block(x)
    return model.lm_head(model.ln_f(x[:, -1]))


def measure_generation(
    positions: list[int], layers: int, width: int, heads: int, device: str, precision: str, repeats: int
) -> dict:
    """Seconds per new token at each position: recurrent `step` vs the parallel forward over the
    prefix; plus how far their logits differ at the last position."""
    torch.manual_seed(0)
    last = max(positions)
    cfg = ModelConfig(n_layer=layers, n_embd=width, n_head=heads, seq_len=last, vocab_size=GEN_VOCAB, bias=False)
    model = ToSTLM(cfg).to(device).eval()
    ids = torch.randint(0, GEN_VOCAB, (1, last), device=device)
    step_seconds = []
    with torch.no_grad(), autocast(device, precision):
        states = model.init_states(1)
        for t in range(last):  # the token at position t + 1 (1-based), reading the state of t tokens
            start = time.perf_counter()
            step_logits = model.step(ids[:, t], states)
            sync(device)
            step_seconds.append(time.perf_counter() - start)
        state_bytes = sum(s.S.nbytes + s.M.nbytes + s.P.nbytes for s in states)
        prefix = {}
        for pos in positions:
            last_logits(model, ids[:, :pos])  # warmup
            sync(device)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                prefix_out = last_logits(model, ids[:, :pos])
                sync(device)
                times.append(time.perf_counter() - start)
            prefix[pos] = statistics.median(times)
    diff = (step_logits.float() - prefix_out.float()).abs().max().item()
    scale = prefix_out.float().abs().max().item()
    recurrent = {pos: statistics.median(step_seconds[max(0, pos - STEP_WINDOW) : pos]) for pos in positions}
    return {
        "recurrent_seconds": recurrent,
        "prefix_seconds": prefix,
        "state_bytes": state_bytes,
        "last_logits_max_abs_diff": diff,
        "last_logits_max_abs": scale,
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


def sdpa_kernel(width: int, heads: int, device: str, precision: str) -> str | None:
    """The aten kernel F.scaled_dot_product_attention picks here for the causal layer, forward
    and backward (flash kernels never store the N x N scores; the math one does)."""
    from torch.profiler import profile

    layer = SelfAttention(layer_config(width, heads, 256), causal=True, n_tokens=256).to(device)
    x = torch.randn(1, 256, width, device=device, requires_grad=True)
    with profile() as prof:
        with autocast(device, precision):
            y = layer(x)
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
            torch.cuda.empty_cache()
            return "error", f"CUDA out of memory: {str(exc).splitlines()[0]}"

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


def run_layers(args: argparse.Namespace, runner: Runner) -> dict:
    results = {}
    for variant in args.variants:
        label = VARIANTS[variant][0]
        cases, timed, mem = [], [], []
        for n in args.tokens:
            case = {"tokens": n}
            passes = 2 + args.repeats + MEMORY_PASSES  # warmup, calibration, repetitions (>= 1 pass), memory
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
                status, out = runner(
                    "measure_layer",
                    variant=variant,
                    n=n,
                    width=args.width,
                    heads=args.heads,
                    device=args.device,
                    precision=args.precision,
                    repeats=args.repeats,
                )
                if status == "ok":
                    case.update(
                        status="ok",
                        ms=round(out["seconds"] * 1e3, 4),
                        ms_repetitions=[round(t * 1e3, 4) for t in out["seconds_all"]],
                        passes_per_repetition=out["passes_per_repetition"],
                        peak_mib=round(out["peak_bytes"] / MiB, 2),
                    )
                    if "other_load" in out:
                        case.update(other_load=round(out["other_load"], 3), attempts=out["attempts"])
                    timed.append((n, out["seconds"]))
                    mem.append((n, max(out["peak_bytes"], 1)))
                else:
                    case.update(status="failed", reason=out)
                load = f", other load {case['other_load']:.0%}" if "other_load" in case else ""
                print(
                    f"{label} {n}: "
                    + (f"{case['ms']:.2f} ms, {case['peak_mib']:.1f} MiB{load}" if status == "ok" else f"failed: {out}")
                    + f" ({time.perf_counter() - start:.1f} s)",
                    file=sys.stderr,
                )
            if case["status"] == "skipped":
                print(f"{label} {n}: skipped, {case['reason']}", file=sys.stderr)
            cases.append(case)
        ok = [c for c in cases if c["status"] == "ok"]
        big = ok[-LARGE_N_POINTS:] if len(ok) > LARGE_N_POINTS else []
        exponents = {
            "time": slope([c["tokens"] for c in ok], [c["ms"] for c in ok]),
            "time_large_n": slope([c["tokens"] for c in big], [c["ms"] for c in big]),
            "memory": slope([c["tokens"] for c in ok], [max(c["peak_mib"], 1e-3) for c in ok]),
            "memory_large_n": slope([c["tokens"] for c in big], [max(c["peak_mib"], 1e-3) for c in big]),
        }
        results[variant] = {
            "label": label,
            "cases": cases,
            "exponents": {k: None if v is None else round(v, 3) for k, v in exponents.items()},
        }
    return results


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
    print(f"generation done ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    positions = [r["position"] for r in rows]
    return {
        "status": "ok",
        "layers": args.gen_layers,
        "vocab_size": GEN_VOCAB,
        "step_window": STEP_WINDOW,
        "rows": rows,
        "state_bytes": out["state_bytes"],
        "other_load": round(out.get("other_load", 0.0), 3),
        "last_logits_max_abs_diff": out["last_logits_max_abs_diff"],
        "last_logits_max_abs": out["last_logits_max_abs"],
        "exponents": {
            name: round(slope(positions, [r[f"{name}_ms"] for r in rows]), 3) if len(rows) > 1 else None
            for name in ("recurrent", "prefix")
        },
    }


# ----------------------------------------------------------------------------------------------
# Output


def fmt_exp(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gen = report["generation"]
    panels = 3 if gen and gen["status"] == "ok" else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.4))
    styles = {
        "tssa": ("tab:blue", "-o"),
        "tssa_causal": ("tab:blue", "--s"),
        "softmax": ("tab:red", "-o"),
        "softmax_causal": ("tab:red", "--s"),
    }
    for variant, res in report["layers"].items():
        ok = [c for c in res["cases"] if c["status"] == "ok"]
        if not ok:
            continue
        color, style = styles[variant]
        n = [c["tokens"] for c in ok]
        e = res["exponents"]
        axes[0].plot(
            n,
            [c["ms"] for c in ok],
            style,
            color=color,
            label=f"{res['label']}: N^{fmt_exp(e['time'])} (large N: N^{fmt_exp(e['time_large_n'])})",
        )
        axes[1].plot(
            n, [c["peak_mib"] for c in ok], style, color=color, label=f"{res['label']}: N^{fmt_exp(e['memory'])}"
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
        ax.legend(fontsize=7)
        ax.title.set_fontsize(9)
    fig.suptitle(f"{report['device']}, torch {report['torch']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cell(case: dict, key: str, digits: int) -> str:
    return f"{case[key]:,.{digits}f}" if case["status"] == "ok" else case["status"]


def markdown_section(report: dict, args: argparse.Namespace, command: str) -> tuple[str, str]:
    mode = "gpu" if report["device_kind"] == "cuda" else "cpu"
    layers = report["layers"]
    names = list(layers)
    head = "| tokens | " + " | ".join(layers[v]["label"] for v in names) + " |"
    rule = "|---:|" + "---:|" * len(names)
    time_rows, mem_rows = [], []
    for i, n in enumerate(report["tokens"]):
        time_rows.append(f"| {n:,} | " + " | ".join(cell(layers[v]["cases"][i], "ms", 2) for v in names) + " |")
        mem_rows.append(f"| {n:,} | " + " | ".join(cell(layers[v]["cases"][i], "peak_mib", 1) for v in names) + " |")
    exp_rows = [
        f"| {res['label']} | {fmt_exp(res['exponents']['time'])} | {fmt_exp(res['exponents']['time_large_n'])} "
        f"| {fmt_exp(res['exponents']['memory'])} | {fmt_exp(res['exponents']['memory_large_n'])} |"
        for res in layers.values()
    ]
    skipped = [
        f"- {res['label']}, {c['tokens']:,} tokens: {c['status']}, {c['reason']}"
        for res in layers.values()
        for c in res["cases"]
        if c["status"] != "ok"
    ]
    lines = [
        heading(f"Attention scaling, {mode}, {report['precision']}", report["device"]),
        "",
        f"`{command}`",
        "",
        ABOUT.format(min_rep_ms=MIN_REPETITION_S * 1e3, memory=MEMORY_HOW[report["device_kind"]], large=LARGE_N_POINTS),
        "",
        f"torch {report['torch']}, {report['threads']} CPU threads; width D {report['width']}, {report['heads']} heads "
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
        *time_rows,
        "",
        "Peak memory of one forward + backward above what was allocated before it, MiB:",
        "",
        head,
        rule,
        *mem_rows,
        "",
        "Measured scaling exponents (slope of log-log least squares):",
        "",
        "| layer | time, all | time, large N | memory, all | memory, large N |",
        "|---|---:|---:|---:|---:|",
        *exp_rows,
        "",
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
        lines += [
            f"Generation with a ToSTLM of {gen['layers']} layers (width {report['width']}, vocabulary "
            f"{gen['vocab_size']:,}), batch 1, no gradients: time per new token at position T (the T-th token). "
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
        ]
    elif gen:
        lines += [f"Generation: failed, {gen['reason']}.", ""]
    if report.get("plot"):
        lines += [
            f"![attention scaling]({os.path.relpath(Path(report['plot']).resolve(), args.write_doc.resolve().parent)})",
            "",
        ]
    return f"attention {mode} {report['precision']} | {report['device']}", "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    runner = Runner(args.device, args.quiet_wait)
    report = {
        "device": device_name(),
        "device_kind": args.device,
        "torch": torch.__version__,
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
    }
    report["sdpa_kernel"] = sdpa_kernel(args.width, args.heads, args.device, args.precision)
    report["layers"] = run_layers(args, runner)
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
        worst = max(loads)
        report["other_load"] = {
            "mean": round(sum(v for v, _ in loads) / len(loads), 3),
            "max": worst[0],
            "max_case": worst[1],
            "disturbed": [(v, name) for v, name in loads if v > RETRY_OTHER_LOAD],
        }
    if args.plot:
        plot(report, args.plot)
        report["plot"] = str(args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    publish(report, args.write_doc, lambda command: markdown_section(report, args, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
