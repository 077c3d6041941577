"""The code stays as ruff (pinned in the dev extra, configured in pyproject.toml) wants it: lint
clean and formatted. `ruff check --fix . && ruff format .` repairs most of what fails here."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys

import pytest
from helpers import REPO


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]])
def test_ruff_is_clean(command: list[str]) -> None:
    ruff = shutil.which("ruff")
    assert ruff, "ruff is not installed: pip install -e '.[dev]'"
    proc = subprocess.run([ruff, *command, "."], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"ruff {' '.join(command)} failed:\n{proc.stdout[-4000:]}{proc.stderr[-2000:]}"


# The modeling code a Hugging Face export carries runs where transformers is, not here.
EXPORTED_CODE = REPO / "pretrain" / "interop" / "hf_tost_code"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared(requirements: list[str]) -> set[str]:
    return {_canonical(re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0]) for r in requirements}


def _imported_modules(folders: list[str]) -> set[str]:
    """Top-level names of every module imported in the .py files under `folders`."""
    found = set()
    for folder in folders:
        for path in (REPO / folder).rglob("*.py"):
            if EXPORTED_CODE in path.parents:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("folders, extra", [(["pretrain", "tools"], None), (["tests"], "dev")])
def test_every_package_the_code_imports_is_declared(folders: list[str], extra: str | None) -> None:
    """Direct imports come from declared distributions, not from another package's dependencies;
    tests may also use the dev extra's."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = _declared(project["dependencies"] + (project["optional-dependencies"][extra] if extra else []))
    local = {"pretrain", "tools", "helpers", "conftest"} | {p.stem for p in (REPO / "tools").rglob("*.py")}
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for module in _imported_modules(folders) - set(sys.stdlib_module_names) - local - {"__future__"}:
        names = {_canonical(d) for d in distributions.get(module, [module])}
        if not names & declared:
            missing[module] = sorted(names)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_nothing_cites_a_file_outside_the_repository() -> None:
    """Users have this repository and nothing beside it: the model math is docs/models.md."""
    outside = re.compile(r"\.\./" + "shared|" + "MODELS" + r"\.md|" + "DESIGN" + r"\.md")
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    citing = []
    for name in tracked.split():
        path = REPO / name
        if path.suffix in {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".sbatch", ".txt"} or name == ".ci/run":
            citing += [f"{name}:{n}" for n, line in enumerate(path.read_text().splitlines(), 1) if outside.search(line)]
    assert not citing, citing
