"""tools/bench/common.py's doc writer: one section per benchmark, the others kept."""

from __future__ import annotations

import importlib.util

from helpers import REPO

spec = importlib.util.spec_from_file_location("bench_common", REPO / "tools" / "bench" / "common.py")
common = importlib.util.module_from_spec(spec)
spec.loader.exec_module(common)


def test_sections_are_created_replaced_and_kept(tmp_path) -> None:
    doc = tmp_path / "docs" / "benchmarks.md"
    common.write_section(doc, "a", "## A\n\nfirst")  # a file that does not exist yet
    common.write_section(doc, "b", "## B")
    common.write_section(doc, "a", "## A\n\nsecond")
    text = doc.read_text()
    assert text.startswith(common.HEADER)
    assert text.count("<!-- bench: a -->") == text.count("<!-- bench: b -->") == 1
    assert "second" in text and "first" not in text
    assert text.index("<!-- bench: a -->") < text.index("<!-- bench: b -->")  # a section keeps its place
