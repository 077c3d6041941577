"""What the benchmarks in tools/bench share: naming the device, a local S3 server, and the
report's ending (JSON on stdout; with --write-doc, one section of docs/benchmarks.md per
(benchmark, device, mode) that a rerun replaces in place)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import fsspec
import torch

from pretrain.distributed import free_port

HEADER = """# Benchmarks

Every section below was written by one of the scripts in `tools/bench/`, run with the command it
shows, on the device it names. A rerun with `--write-doc docs/benchmarks.md` replaces only the
section of the same benchmark, mode and device; `--help` on each script lists its knobs.
"""
# The Base recipes require shard URLs; benchmarks build their models and never read the shards.
UNUSED_DATA = 'data.urls="file:///unused/shard-{0..1}.tar"'
TOST_BASE = ["+exp=tost_gpt2", UNUSED_DATA]
SECTION_MARKER = re.compile(r"^<!-- bench: (.+) -->$", re.MULTILINE)
S3_BUCKET = "bench"
S3_START_TIMEOUT_S = 30


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
    ends = [n.start() for n in markers[1:]] + ([len(old)] if markers else [])
    sections = {m.group(1): old[m.start() : end].rstrip() + "\n" for m, end in zip(markers, ends, strict=True)}
    sections[key] = f"<!-- bench: {key} -->\n{text.rstrip()}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([HEADER, *sections.values()]))


def add_write_doc_flag(parser: argparse.ArgumentParser) -> None:
    """--write-doc MARKDOWN, which `publish` reads."""
    parser.add_argument(
        "--write-doc",
        type=Path,
        metavar="MARKDOWN",
        help="also write the results as a section of this Markdown file, e.g. docs/benchmarks.md",
    )


def heading(title: str, device: str) -> str:
    """A section's title line: what was measured, on which device, when."""
    return f"## {title}: {device}, {datetime.date.today().isoformat()}"


def publish(report: dict, write_doc: Path | None, *sections: Callable[[str], tuple[str, str]]) -> None:
    """Print the report as JSON; with `write_doc`, write each section `section(command)` gives
    (its key and text) for the command line that ran."""
    print(json.dumps(report, indent=2))
    if write_doc:
        for section in sections:
            write_section(write_doc, *section(shlex.join(["python", *sys.argv])))


class LocalS3:
    """moto's S3 server on 127.0.0.1 in a process of its own (a server thread in this process
    would take the training process's interpreter lock), with one bucket."""

    def __init__(self) -> None:
        port = free_port()
        self.options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "bench", "secret": "bench"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + S3_START_TIMEOUT_S
        while True:
            try:
                fsspec.filesystem("s3", skip_instance_cache=True, **self.options).mkdir(S3_BUCKET)
                return
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.close()
                    raise
                time.sleep(0.2)

    def cpu_seconds(self) -> float:
        """CPU time the server has used so far (user + system, from /proc)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait()


def upload(directory: str, name: str, storage_options: dict) -> str:
    fs = fsspec.filesystem("s3", **storage_options)
    fs.put(f"{directory}/", f"{S3_BUCKET}/{name}/", recursive=True)
    return f"s3://{S3_BUCKET}/{name}"
