"""What every benchmark in tools/bench shares: naming the device, and keeping docs/benchmarks.md
as one section per (benchmark, device, mode) that a rerun replaces in place."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch

HEADER = """# Benchmarks

Every section below was written by one of the scripts in `tools/bench/`, run with the command it
shows, on the device it names. A rerun with `--write-doc docs/benchmarks.md` replaces only the
section of the same benchmark, mode and device; `--help` on each script lists its knobs.
"""
# The Base recipes require shard URLs; benchmarks build their models and never read the shards.
UNUSED_DATA = 'data.urls="file:///unused/shard-{0..1}.tar"'
TOST_BASE = ["+exp=tost_gpt2", UNUSED_DATA]
SECTION_MARKER = re.compile(r"^<!-- bench: (.+) -->$", re.MULTILINE)


def device_name() -> str:
    """What the work runs on: the GPU's name, else the CPU model and core count."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpuinfo = Path("/proc/cpuinfo")
    names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE) if cpuinfo.exists() else []
    return f"{names[0] if names else platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def write_section(path: Path, key: str, text: str) -> None:
    """Put `text` in the file as the section named `key`, keeping every other section."""
    old = path.read_text() if path.exists() else ""
    markers = list(SECTION_MARKER.finditer(old))
    sections = {
        m.group(1): old[m.start() : n.start() if n else len(old)].rstrip() + "\n"
        for m, n in zip(markers, [*markers[1:], None], strict=True)
    }
    sections[key] = f"<!-- bench: {key} -->\n{text.rstrip()}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([HEADER, *sections.values()]))
