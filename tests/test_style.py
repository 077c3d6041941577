"""The code stays as ruff (pinned in the dev extra, configured in pyproject.toml) wants it: lint
clean and formatted. `ruff check --fix . && ruff format .` repairs most of what fails here."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from helpers import REPO


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]])
def test_ruff_is_clean(command: list[str]) -> None:
    ruff = shutil.which("ruff")
    assert ruff, "ruff is not installed: pip install -e '.[dev]'"
    proc = subprocess.run([ruff, *command, "."], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"ruff {' '.join(command)} failed:\n{proc.stdout[-4000:]}{proc.stderr[-2000:]}"
