"""MFU's denominator: the device's dense bf16 peak from the table, the override, or none at all."""

from __future__ import annotations

import logging

import pytest
import torch

from pretrain.config import load_config
from pretrain.errors import UserError
from pretrain.tracking import metrics
from pretrain.tracking.metrics import PEAK_BF16_FLOPS, bf16_peak_for_name, mfu, peak_flops

# What torch.cuda.get_device_name() reports on each GPU, and the table key that must answer it.
REPORTED_NAMES = {
    "NVIDIA H100 80GB HBM3": "H100",  # SXM5
    "NVIDIA H100 PCIe": "H100 PCIe",
    "NVIDIA H100 80GB PCIe": "H100 PCIe",
    "NVIDIA H100 NVL": "H100 NVL",
    "NVIDIA H200": "H200",
    "NVIDIA H200 NVL": "H200 NVL",
    "NVIDIA GH200 480GB": "GH200",
    "NVIDIA B200": "B200",
    "NVIDIA A100-SXM4-80GB": "A100",
    "NVIDIA A100-SXM4-40GB": "A100",
    "NVIDIA A100 80GB PCIe": "A100",
    "NVIDIA A100-PCIE-40GB": "A100",
    "NVIDIA A10": "A10",
    "NVIDIA L40S": "L40S",
    "NVIDIA L40": "L40",
    "NVIDIA L4": "L4",
    "NVIDIA GeForce RTX 4090": "RTX 4090",
}
UNKNOWN = [
    "NVIDIA A10G",  # AWS's part, not an A10: no NVIDIA datasheet
    "NVIDIA H20",
    "NVIDIA H800",
    "Tesla V100-SXM2-16GB",  # no bf16 tensor cores
    "NVIDIA A100-SXM4-40GB MIG 1g.5gb",  # a slice of the GPU
    "NVIDIA GeForce RTX 4090 Laptop GPU",
    "NVIDIA GeForce RTX 4090 D",
    "AMD Instinct MI300X",
]


def test_every_entry_answers_its_reported_names_and_no_other():
    assert set(REPORTED_NAMES.values()) == set(PEAK_BF16_FLOPS)  # no entry without a real name that reaches it
    for name, key in REPORTED_NAMES.items():
        assert bf16_peak_for_name(name) == PEAK_BF16_FLOPS[key], name
    # the traps: a shorter key must not answer a longer name first
    assert bf16_peak_for_name("NVIDIA H100 PCIe") == 756e12 != PEAK_BF16_FLOPS["H100"]
    assert bf16_peak_for_name("NVIDIA L40S") == 362e12 and bf16_peak_for_name("NVIDIA L4") == 121e12
    assert bf16_peak_for_name("NVIDIA A100-SXM4-80GB") == 312e12 and bf16_peak_for_name("NVIDIA A10") == 125e12
    assert bf16_peak_for_name("nvidia h100 80gb hbm3") == 989e12


@pytest.mark.parametrize("name", UNKNOWN)
def test_a_device_not_in_the_table_has_no_peak(name: str):
    assert bf16_peak_for_name(name) is None


def test_the_override_wins_and_only_it_gives_a_cpu_or_fp32_peak(monkeypatch, caplog):
    cpu = torch.device("cpu")
    assert peak_flops(cpu, "bf16") is None and peak_flops(cpu, "fp32") is None
    assert peak_flops(cpu, "fp32", 2.5) == 2.5e12
    assert mfu(1000.0, 1e9, peak_flops(cpu, "bf16", 2.0)) == pytest.approx(0.5)
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    monkeypatch.setattr(metrics, "_warned", set())
    assert peak_flops(cuda, "bf16") == 756e12
    assert peak_flops(cuda, "bf16", 700.0) == 700e12
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        assert peak_flops(cuda, "fp32") is None  # no TF32 assumption
        assert peak_flops(cuda, "fp32") is None
    assert len(caplog.records) == 1 and "train.peak_tflops" in caplog.text  # once per device and precision
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A10G")
    assert peak_flops(cuda, "bf16") is None and peak_flops(cuda, "bf16", 70.0) == 70e12


def test_peak_tflops_config():
    assert load_config([]).train.peak_tflops is None
    assert load_config(["train.peak_tflops=756"]).train.peak_tflops == 756.0
    with pytest.raises(UserError, match="train.peak_tflops"):
        load_config(["train.peak_tflops=0"])
