"""What of tools/gpu_check.py and the GPU suite can be checked without a GPU: the check on a
machine without CUDA (the environment, one FAIL line, exit code 1), its verdicts on real pytest
reports and on the benchmark's report, its runner's timeout (tests/test_gpu.py checks its own
runs' configs without a GPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import REPO, tool

gpu_check = tool("gpu_check")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the path of a machine without CUDA")
def test_without_cuda_the_check_prints_the_environment_and_ends_with_one_fail_line(tmp_path):
    proc = subprocess.run(
        [str(REPO / "tools" / "gpu_check.sh"), "--out", str(tmp_path / "out")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = proc.stdout.splitlines()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert [line.split(":")[0] for line in lines[:-1]] == [
        "python",
        "torch",
        "nccl",
        "deepspeed",
        "deepspeed ops this machine can build",
        "triton",
        "nvidia driver",
        "gpus",
    ]
    assert f"torch: {torch.__version__}, built for CUDA " in proc.stdout and "cpu_adam yes" in proc.stdout
    assert lines[-1].startswith("FAIL: no CUDA GPU visible to torch (") and lines[-1].endswith(")")
    assert sum(line.startswith(("PASS", "FAIL")) for line in lines) == 1
    assert (tmp_path / "out" / "environment.txt").read_text() == "\n".join(lines[:-1]) + "\n"


@pytest.mark.slow
def test_the_suite_verdict_reads_real_pytest_reports(tmp_path):
    """pytest's own JUnit reports: a failure fails the check and is named; a suite whose every test
    was skipped (no GPU) has checked nothing and fails too; passes with skips pass."""
    (tmp_path / "test_x.py").write_text(
        "import pytest\n"
        "def test_a(): pass\n"
        "def test_b(): assert 1 == 2\n"
        "@pytest.mark.skip(reason='no GPU')\n"
        "def test_c(): pass\n"
    )

    def verdict(*select: str) -> tuple[bool, str]:
        command = [sys.executable, "-m", "pytest", "test_x.py", "-p", "no:cacheprovider", "--junitxml=r.xml", *select]
        code = subprocess.run(command, cwd=tmp_path, capture_output=True, timeout=60).returncode
        return gpu_check.suite_verdict(code, (tmp_path / "r.xml").read_text())

    assert verdict() == (False, "1 passed, 1 failed, 0 errors, 1 skipped: test_x.test_b")
    assert verdict("-k", "a or c") == (True, "1 passed, 0 failed, 0 errors, 1 skipped")
    assert verdict("-k", "c") == (False, "0 passed, 0 failed, 0 errors, 1 skipped")
    assert gpu_check.suite_verdict(4, None) == (False, "pytest exited 4 without a report")
    assert gpu_check.suite_verdict(None, None) == (False, f"timed out after {gpu_check.SUITE_TIMEOUT_S} s")


def bench_report(*statuses: str) -> str:
    """tools/bench/engines.py's report, with one run of each status."""
    results = []
    for status, model in zip(statuses, ("tost_gpt2", "gpt2", "tost_gpt2"), strict=False):
        run = {"model": model, "engine": "zero2", "seq_len": 1024, "status": status}
        if status == "ok":
            run |= {"tokens_per_s": 123456.7, "mfu": 0.4321}
        else:
            run["message"] = {"skipped": "past --time-budget 120 s", "oom": "CUDA out of memory."}[status]
        results.append(run)
    return json.dumps({"device": "NVIDIA H100 80GB HBM3", "results": results})


def test_the_benchmark_verdict_passes_measured_runs_and_names_a_failed_one():
    assert gpu_check.bench_verdict(0, bench_report("ok", "skipped")) == (
        True,
        "tost_gpt2 zero2 1024: 123,457 tok/s, MFU 43.2% (1 runs past its time budget left out)",
    )
    assert gpu_check.bench_verdict(0, bench_report("ok", "oom")) == (
        False,
        "gpt2 zero2 1024: oom: CUDA out of memory.",
    )
    assert gpu_check.bench_verdict(0, bench_report("skipped")) == (False, "no run was measured")
    assert gpu_check.bench_verdict(2, "") == (False, "exited 2")
    assert gpu_check.bench_verdict(0, "engines: error") == (False, "its report is not the JSON object it prints")


@pytest.mark.slow  # it waits out a timeout
def test_a_command_is_shown_and_logged_as_it_runs_and_killed_past_its_timeout(tmp_path, capsys):
    log = tmp_path / "log"
    slow = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    assert gpu_check.run(slow, log, timeout_s=1) is None
    assert log.read_text() == "started\n" and capsys.readouterr().out == "started\n"
    script = "import sys; print('{}'); print('progress', file=sys.stderr)"
    assert gpu_check.run([sys.executable, "-c", script], log, 30, stdout_to=tmp_path / "report.json") == 0
    assert (tmp_path / "report.json").read_text() == "{}\n" and log.read_text() == "progress\n"
