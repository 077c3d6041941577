"""Check a new GPU machine in one command: print its environment, run the GPU test suite, run a
short benchmark, and end with one line, `PASS ...` (exit code 0) or `FAIL: <reason>` (exit code 1).

    tools/gpu_check.sh                        # the same as: python tools/gpu_check.py
    tools/gpu_check.sh --out /tmp/gpu-check   # where its files go (default: runs/gpu_check)

The environment: Python, torch and the CUDA it was built for, NCCL, DeepSpeed and which of its
compiled ops this machine can build, Triton, the NVIDIA driver, and each GPU's name and memory.
The suite is `python -m pytest -m gpu` (tests/test_gpu.py and the other tests marked gpu): every
engine, exact resume, offload, torch.compile, the Triton kernels, the vision models, generation,
about 3 to 5 minutes on one H100 (an estimate). The benchmark is tools/bench/engines.py --gpu on
ToST-Base and GPT2-Base at 1k context, about a minute. Without a GPU that torch can use, only the
environment is printed. Under --out: environment.txt, pytest.log, pytest.xml (JUnit), bench.json
(the benchmark's report) and bench.log.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SUITE = ["-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider"]
# tools/bench/engines.py --gpu at one context with few steps: 2 models x 2 engines, about a minute;
# the time budget stops it starting runs past 2 minutes on a slower GPU.
BENCH = ["tools/bench/engines.py", "--gpu", "--steps", "5", "--contexts", "1024", "--time-budget", "120"]
SUITE_TIMEOUT_S, BENCH_TIMEOUT_S = 1800, 600


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check"), help="directory for the logs and reports")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    lines, problem = environment()
    print("\n".join(lines), flush=True)
    (out / "environment.txt").write_text("\n".join(lines) + "\n")
    ok, verdict = check(out, problem)
    print(f"PASS: {verdict}" if ok else f"FAIL: {verdict}", flush=True)
    return 0 if ok else 1


def check(out: Path, problem: str | None) -> tuple[bool, str]:
    """(passed, what the last line says) of the suite and then the benchmark, each run only where
    what came before passed."""
    if problem:
        return False, f"no CUDA GPU visible to torch ({problem})"
    report = out / "pytest.xml"
    report.unlink(missing_ok=True)  # an earlier check's report is not this one's
    code = run([sys.executable, *SUITE, f"--junitxml={report}"], out / "pytest.log", SUITE_TIMEOUT_S)
    ok, suite = suite_verdict(code, report.read_text() if report.is_file() else None)
    if not ok:
        return False, f"GPU suite: {suite} (see {out / 'pytest.log'})"
    code = run([sys.executable, *BENCH], out / "bench.log", BENCH_TIMEOUT_S, stdout_to=out / "bench.json")
    ok, bench = bench_verdict(code, (out / "bench.json").read_text())
    if not ok:
        return False, f"benchmark: {bench} (see {out / 'bench.log'})"
    return True, f"{torch.cuda.get_device_name(0)}: GPU suite {suite}; benchmark {bench}"


def environment() -> tuple[list[str], str | None]:
    """The lines describing this machine, and why torch cannot use a GPU here (None if it can)."""
    lines = [
        f"python: {platform.python_version()} ({sys.executable})",
        f"torch: {torch.__version__}, built for CUDA {torch.version.cuda or 'none (a CPU build)'}",
        f"nccl: {nccl_version()}",
        f"deepspeed: {version('deepspeed')}",
        f"deepspeed ops this machine can build: {deepspeed_ops()}",
        f"triton: {version('triton')}",
        f"nvidia driver: {driver_version()}",
    ]
    problem = cuda_problem()
    if problem:
        return [*lines, f"gpus: none ({problem})"], problem
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        lines.append(
            f"gpu {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}, "
            f"{p.multi_processor_count} SMs"
        )
    return lines, None


def cuda_problem() -> str | None:
    """Why torch cannot use a CUDA GPU here, in a few words; None when it can."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build; install a CUDA build of torch"
    if torch.cuda.is_available():
        return None
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None:
        return f"torch finds no GPU with CUDA_VISIBLE_DEVICES={hidden!r}"
    return "torch finds no GPU: is the NVIDIA driver installed, and does nvidia-smi list one?"


def version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def nccl_version() -> str:
    if torch.version.cuda is None or not torch.distributed.is_nccl_available():
        return "not available (this torch has no NCCL)"
    return ".".join(map(str, torch.cuda.nccl.version()))


def deepspeed_ops() -> str:
    """DeepSpeed's op builders for this machine's accelerator, each compatible (buildable) or not:
    what `ds_report` shows, without compiling anything."""
    try:
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's accelerator notice is not a result
            import deepspeed.ops

            compatible = deepspeed.ops.__compatible_ops__
    except ImportError as exc:
        return f"none ({exc})"
    return ", ".join(
        f"{name} {'yes' if ok else 'no'}" for name, ok in sorted(compatible.items()) if "not_impl" not in name
    )


def driver_version() -> str:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "unknown (no nvidia-smi on PATH)"
    query = [smi, "--query-gpu=driver_version", "--format=csv,noheader"]
    try:
        proc = subprocess.run(query, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "unknown (nvidia-smi did not answer in 30 s)"
    versions = sorted(set(proc.stdout.split()))
    return ", ".join(versions) if proc.returncode == 0 and versions else f"unknown (nvidia-smi: {proc.stderr.strip()})"


def run(command: list[str], log: Path, timeout_s: float, stdout_to: Path | None = None) -> int | None:
    """Run `command` in the repository, its output shown as it comes and written to `log`; with
    `stdout_to`, stdout goes to that file instead (stderr alone is shown and logged). The exit code,
    or None when it ran past `timeout_s` and was killed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with open(log, "w") as logged, open(stdout_to or os.devnull, "w") as kept:
        proc = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=kept if stdout_to else subprocess.PIPE,
            stderr=subprocess.PIPE if stdout_to else subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        expired = threading.Event()

        def kill() -> None:
            expired.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        killer = threading.Timer(timeout_s, kill)
        killer.start()
        try:
            for line in proc.stderr if stdout_to else proc.stdout:
                print(line, end="", flush=True)
                logged.write(line)
            code = proc.wait()
        finally:
            killer.cancel()
    return None if expired.is_set() else code


def suite_verdict(code: int | None, junit_xml: str | None) -> tuple[bool, str]:
    """(passed, summary) of a pytest run from its exit code and JUnit report: passed when pytest
    exited 0 and at least one test passed (a suite skipped whole has checked nothing)."""
    if code is None:
        return False, f"timed out after {SUITE_TIMEOUT_S} s"
    if junit_xml is None:
        return False, f"pytest exited {code} without a report"
    root = ET.fromstring(junit_xml)
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    summary = f"{passed} passed, {counts['failures']} failed, {counts['errors']} errors, {counts['skipped']} skipped"
    failed = [
        f"{case.get('classname')}.{case.get('name')}"
        for case in root.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    if failed:
        summary += ": " + ", ".join(failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
    if code == 0 and passed > 0 and not failed:
        return True, summary
    return False, summary if code in (0, 1) else f"pytest exited {code}; {summary}"


def bench_verdict(code: int | None, stdout: str) -> tuple[bool, str]:
    """(passed, summary) of tools/bench/engines.py: passed when it exited 0 and every run it
    started measured (runs past its time budget are left out, and said so)."""
    if code is None:
        return False, f"timed out after {BENCH_TIMEOUT_S} s"
    if code != 0:
        return False, f"exited {code}"
    try:
        results = json.loads(stdout)["results"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return False, "its report is not the JSON object it prints"
    bad = [r for r in results if r["status"] not in ("ok", "skipped")]
    if bad:
        return False, "; ".join(
            f"{r['model']} {r['engine']} {r['seq_len']}: {r['status']}: {r['message']}" for r in bad
        )
    done = [
        f"{r['model']} {r['engine']} {r['seq_len']}: {r['tokens_per_s']:,.0f} tok/s, "
        f"MFU {'-' if r['mfu'] is None else format(r['mfu'], '.1%')}"
        for r in results
        if r["status"] == "ok"
    ]
    if not done:
        return False, "no run was measured"
    skipped = len(results) - len(done)
    return True, "; ".join(done) + (f" ({skipped} runs past its time budget left out)" if skipped else "")


if __name__ == "__main__":
    sys.exit(main())
