"""tools/bench/engines.py --gpu without a GPU: its run plan (models x engines x contexts, the
micro-batch rule) and configs, its refusals, how a failed or out-of-memory run is recorded, the
docs section from a made-up report; and tools/bench/gpu.sh, which runs it on a GPU machine."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
from helpers import REPO

from pretrain.config import load_config

BENCH = REPO / "tools" / "bench"
GPU_SCRIPT = BENCH / "gpu.sh"


def load_tool(name: str):
    """A benchmark script as a module; they import their neighbour `common` as the scripts do."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # as an import would: dataclasses look their module up
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


engines = load_tool("engines")


def test_gpu_plan_is_contexts_by_engines_by_models_at_16k_tokens_per_micro_batch() -> None:
    runs = engines.plan(engines.parse_args(["--gpu"]))
    models = ("tost_gpt2", "gpt2")
    assert [(r.seq_len, r.engine, r.model) for r in runs] == [
        (n, engine, model) for n in (1024, 4096, 8192) for engine in ("zero2", "fsdp") for model in models
    ]
    assert {r.seq_len: r.micro_batch for r in runs} == {1024: 16, 4096: 4, 8192: 2}
    assert all(r.global_batch == r.micro_batch for r in runs)  # one micro-batch per optimizer step

    runs = engines.plan(engines.parse_args(["--gpu", "--contexts", "3000", "32768", "--gpu-engines", "zero0"]))
    assert [(r.seq_len, r.engine, r.micro_batch) for r in runs] == [(3000, "zero0", 5)] * 2 + [(32768, "zero0", 1)] * 2
    assert {r.micro_batch for r in engines.plan(engines.parse_args(["--gpu", "--micro-batch", "3"]))} == {3}

    args = engines.parse_args([])  # the CPU benchmark is unchanged: smoke models, five engines, their recipe's length
    assert len(engines.plan(args)) == 10 and {r.seq_len for r in engines.plan(args)} == {None}
    assert (args.warmup, args.steps, args.world_size, args.precision) == (3, 10, 2, "fp32")


def test_gpu_runs_configure_the_context_engine_and_batch() -> None:
    runs = {(r.model, r.engine, r.seq_len): r for r in engines.plan(engines.parse_args(["--gpu"]))}
    tost = load_config(runs[("tost_gpt2", "zero2", 8192)].overrides("bf16", compile_blocks=False))
    gpt2 = load_config(runs[("gpt2", "fsdp", 8192)].overrides("bf16", compile_blocks=True))
    assert (tost.model.name, tost.model.seq_len, tost.engine.name, tost.engine.zero_stage) == (
        "tost",
        8192,
        "deepspeed",
        2,
    )
    assert (gpt2.model.name, gpt2.model.seq_len, gpt2.engine.name, gpt2.engine.compile) == ("gpt2", 8192, "fsdp", True)
    assert tost.engine.precision == gpt2.engine.precision == "bf16"
    assert tost.train.micro_batch_size == tost.train.global_batch_size == 2


def test_gpu_refusals(capsys) -> None:
    for argv in (
        ["--gpu", "--world-size", "2"],
        ["--gpu", "--global-batch", "8"],
        ["--gpu", "--contexts", "0"],
        ["--gpu", "--micro-batch", "0"],
    ):
        with pytest.raises(SystemExit) as exc:
            engines.parse_args(argv)
        assert exc.value.code == 2, argv
    capsys.readouterr()
    if not torch.cuda.is_available():
        assert engines.main(["--gpu", "--contexts", "1024"]) == engines.BAD_INPUT_EXIT
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--gpu needs a CUDA GPU" in err


def test_a_failed_or_out_of_memory_run_is_recorded_and_the_rest_go_on(monkeypatch) -> None:
    args = engines.parse_args(["--gpu", "--contexts", "8192", "--gpu-engines", "fsdp"])
    run = engines.plan(args)[1]
    cfg = load_config(run.overrides("bf16", compile_blocks=False))

    def world_that_fails(*_args, **_kwargs):
        raise RuntimeError("rank 0 failed:\nTraceback (most recent call last):\n  ...\nValueError: no kernel\n")

    monkeypatch.setattr(engines, "run_local_world", world_that_fails)
    failed = engines.run_variant(run, cfg, args)
    assert (failed["status"], failed["message"], failed["seq_len"], failed["micro_batch"]) == (
        "failed",
        "ValueError: no kernel",
        8192,
        2,
    )
    oom = {"status": "oom", "message": "CUDA out of memory. Tried to allocate 6.14 GiB", "memory_gib": 70.0}
    monkeypatch.setattr(engines, "run_local_world", lambda *_args, **_kwargs: [oom])
    assert engines.run_variant(run, cfg, args) | {"message": None} == {
        "model": "gpt2",
        "engine": "fsdp",
        "seq_len": 8192,
        "micro_batch": 2,
        "global_batch": 2,
        "status": "oom",
        "message": None,
    }


def made_up_report() -> dict:
    """A --gpu report as main() assembles it, with invented figures (for the rendering only)."""

    def ok(model: str, engine: str, seq_len: int, tokens_per_s: float, mfu: float | None) -> dict:
        micro = engines.gpu_micro_batch(seq_len)
        return {
            "model": model,
            "engine": engine,
            "seq_len": seq_len,
            "micro_batch": micro,
            "global_batch": micro,
            "status": "ok",
            "steps_per_s": 1.0,
            "tokens_per_s": tokens_per_s,
            "peak_mem_gib_per_rank": [12.345],
            "final_loss": 10.9,
            "flops_per_token": 1.0,
            "peak_tflops": None if mfu is None else 989.0,
            "mfu": mfu,
        }

    results = [
        ok("tost_gpt2", "zero2", 1024, 420_000.0, 0.31),
        ok("gpt2", "zero2", 1024, 400_000.0, 0.52),
        ok("tost_gpt2", "fsdp", 1024, 300_000.0, None),
        ok("gpt2", "fsdp", 1024, 400_000.0, None),
        ok("tost_gpt2", "zero2", 8192, 410_000.0, 0.3),
        {"model": "gpt2", "engine": "zero2", "seq_len": 8192, "micro_batch": 2, "global_batch": 2}
        | {"status": "oom", "message": "CUDA out of memory. Tried to allocate 6.14 GiB"},
    ]
    return {
        "device": "NVIDIA H100 80GB HBM3",
        "torch": "2.11.0+cu130",
        "deepspeed": "0.19.8",
        "world_size": 1,
        "precision": "bf16",
        "compile": False,
        "gpu": {"name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.2, "cuda": "13.0"},
        "results": results,
        "goals": engines.goal_checks(results),
    }


def test_goal_checks_from_the_table() -> None:
    report = made_up_report()
    assert report["goals"] == {
        "zero2": {"gpt2_mfu_1k": 0.52, "tost_over_gpt2_1k": 1.05, "tost_over_gpt2_8k": None},  # GPT-2 8k ran out
        "fsdp": {"gpt2_mfu_1k": None, "tost_over_gpt2_1k": 0.75, "tost_over_gpt2_8k": None},
    }


def test_gpu_section_names_the_device_and_tabulates_every_run() -> None:
    args = engines.parse_args(["--gpu", "--write-doc", "docs/benchmarks.md"])
    key, text = engines.markdown_section(made_up_report(), args, "python tools/bench/engines.py --gpu")
    assert key == "gpu bf16 | NVIDIA H100 80GB HBM3"
    assert text.startswith("## Base models, 1 GPU, bf16: NVIDIA H100 80GB HBM3, ")
    assert "NVIDIA H100 80GB HBM3, 79 GiB; torch 2.11.0+cu130, CUDA 13.0, DeepSpeed 0.19.8; 5 warmup + 30 timed" in text
    assert "| ToST-Base | zero2 | 1,024 | 16 | 420,000 | 31.0% | 12.35 |" in text
    assert "| ToST-Base | fsdp | 1,024 | 16 | 300,000 | n/a | 12.35 |" in text
    assert "| GPT2-Base | zero2 | 8,192 | 2 | oom: CUDA out of memory. Tried to allocate 6.14 GiB | | |" in text
    assert "MFU n/a (unknown device peak: pass --peak-tflops)." in text
    assert (
        "zero2: GPT2-Base MFU at 1k 52.0% (met); ToST-Base / GPT2-Base tokens/s at 1k 1.05x (met), at 8k not measured"
        in text
    )
    assert "fsdp: GPT2-Base MFU at 1k not measured; ToST-Base / GPT2-Base tokens/s at 1k 0.75x (not met)" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + 6  # the header and every run


def script_commands() -> list[list[str]]:
    """The argument lists of gpu.sh's `python3 tools/bench/X.py ...` commands, continuation lines joined."""
    text = GPU_SCRIPT.read_text().replace("\\\n", " ")
    return [shlex.split(m.group(1)) for m in re.finditer(r"python3 (tools/bench/\w+\.py[^\n]*)", text)]


def test_gpu_script_is_valid_bash_and_calls_the_benchmarks_with_their_flags(capsys, tmp_path) -> None:
    subprocess.run(["bash", "-n", str(GPU_SCRIPT)], check=True)
    env = {**os.environ, "OUT": str(tmp_path)}
    wrong = subprocess.run(["bash", str(GPU_SCRIPT), "benchmarks"], env=env, capture_output=True)
    assert wrong.returncode == 2 and b"no part benchmarks" in wrong.stderr and not any(tmp_path.iterdir())
    commands = script_commands()
    assert [c[0].removeprefix("tools/bench/") for c in commands] == ["engines.py", "attention.py", "attention.py"]
    attention = load_tool("attention")
    for command in commands:
        tool = engines if command[0].endswith("engines.py") else attention
        with pytest.raises(SystemExit):
            tool.parse_args(["--help"])
        help_text = capsys.readouterr().out
        for flag in (arg for arg in command[1:] if arg.startswith("--")):
            assert re.search(rf"{flag}(?![\w-])", help_text), (command[0], flag)
    args = engines.parse_args(commands[0][1:])  # every value parses, as on the GPU machine
    assert args.gpu and args.time_budget and len(engines.plan(args)) == 12
    script = GPU_SCRIPT.read_text()
    assert "python3 -m pytest -m gpu" in script and "--write-doc docs/benchmarks.md" in script
