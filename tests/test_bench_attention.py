"""tools/bench/attention.py end to end on tiny sizes: every CPU variant, the saved-for-backward
bytes, the targets summary, the time to first token, the plot and the Markdown section."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO

BENCH = REPO / "tools" / "bench" / "attention.py"
CPU_VARIANTS = [
    *("tssa_eager", "tssa_fused", "softmax", "tssa_causal_eager", "tssa_causal_fused", "softmax_causal"),
    *("core_eager", "core_fused", "core_causal_eager", "core_causal_fused"),
]


@pytest.mark.slow
def test_attention_bench_tiny(tmp_path) -> None:
    doc, png = tmp_path / "benchmarks.md", tmp_path / "scaling.png"
    # A copy of the real document: the section is written beside the others, which stay.
    doc.write_text((REPO / "docs" / "benchmarks.md").read_text())
    cmd = [
        sys.executable,
        str(BENCH),
        "--device",
        "cpu",
        "--width",
        "64",
        "--heads",
        "4",
        "--tokens",
        "256",
        "512",
        "--positions",
        "64",
        "128",
        "--repeats",
        "1",
        "--quiet-wait",
        "0",
        "--max-case-seconds",
        "60",
        "--plot",
        str(png),
        "--write-doc",
        str(doc),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)

    assert list(report["layers"]) == CPU_VARIANTS  # no triton variant without --device cuda
    assert (report["width"], report["heads"], report["precision"]) == (64, 4, "fp32")
    for variant, res in report["layers"].items():
        assert [c["tokens"] for c in res["cases"]] == [256, 512]
        for case in res["cases"]:
            assert case["status"] == "ok", (variant, case)
            assert case["ms"] > 0 and case["peak_mib"] >= 0 and case["saved_bytes"] > 0
        assert set(res["exponents"]) == {"time", "time_from_4k", "memory", "memory_from_4k"}
        assert res["exponents"]["time_from_4k"] is None  # no length >= 4k was measured

    saved = {v: [c["saved_bytes"] for c in res["cases"]] for v, res in report["layers"].items()}
    for n in range(2):
        assert saved["tssa_causal_fused"][n] < saved["tssa_causal_eager"][n]
        assert saved["tssa_fused"][n] < saved["tssa_eager"][n]
        assert saved["core_causal_fused"][n] < saved["core_causal_eager"][n]
        # The input (1, N, D) fp32 is counted: at least N * D * 4 bytes for every layer.
        assert all(saved[v][n] >= [256, 512][n] * 64 * 4 for v in saved)

    targets = report["targets"]
    assert targets["tokens"] == 512  # the measured length nearest 8k
    for form in ("causal", "non_causal"):
        fused = targets[form]["fused"]
        assert set(fused) == {"time_over_eager", "core_time_over_eager", "time_over_sdpa", "saved_over_sdpa"}
        assert all(value is not None and value > 0 for value in fused.values())
        assert set(targets[form]["time_exponent_from_4k"]) == {"eager", "fused", "sdpa"}
    assert targets["causal"]["fused"]["saved_over_sdpa"] == pytest.approx(
        saved["tssa_causal_fused"][1] / saved["softmax_causal"][1], rel=1e-3
    )

    gen = report["generation"]
    assert gen["status"] == "ok" and [r["position"] for r in gen["rows"]] == [64, 128]
    first = gen["first_token"]
    assert first["prompt_tokens"] == 128 and first["step_ms"] > 0 and first["prefill_ms"] > 0
    assert first["logits_max_abs_diff"] <= 1e-3 * max(1.0, first["logits_max_abs"])

    assert png.stat().st_size > 0
    text = doc.read_text()
    assert "<!-- bench: lost_rank" in text  # another benchmark's section, kept
    for needle in ("Saved for backward", "Targets at 512 tokens", "causal TSSA fused", "Time to first token"):
        assert needle in text


@pytest.mark.slow
def test_the_document_mask_mode_writes_its_own_section(tmp_path) -> None:
    doc = tmp_path / "benchmarks.md"  # a new document: the section is this mode's alone
    cmd = [sys.executable, str(BENCH), "--only", "document-mask", "--device", "cpu", "--width", "64", "--heads", "4"]
    cmd += [
        "--tokens",
        "512",
        "--document-tokens",
        "64",
        "--repeats",
        "1",
        "--quiet-wait",
        "0",
        "--write-doc",
        str(doc),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mask = json.loads(proc.stdout)["document_mask"]
    assert (mask["tokens"], mask["mean_document_tokens"]) == (512, 64) and mask["documents"] > 2
    assert list(mask["layers"]) == ["tssa_causal_fused", "softmax_causal"]
    for res in mask["layers"].values():
        assert res["unmasked"]["status"] == res["masked"]["status"] == "ok"
        assert res["masked_over_unmasked"] == pytest.approx(res["masked"]["ms"] / res["unmasked"]["ms"], rel=1e-2)
    text = doc.read_text()
    assert text.count("<!-- bench: attention document mask cpu fp32 | ") == text.count("<!-- bench: ") == 1
    assert "## Document masking, cpu, fp32" in text and "| causal softmax (SDPA) |" in text
