"""The README's concept map (book chapter -> numpy_ref file -> torch_impl file) names every module
of both trees in its own column, re-read each run so that a file added later must be placed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def concept_map_columns() -> dict[str, set[str]]:
    """The file names written in backticks in the map's numpy_ref and torch_impl columns."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Concept map", 1)[1]
    rows = [line for line in section.split("\n\n", 2)[1].splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    columns = {"numpy_ref": header.index("`numpy_ref/`"), "torch_impl": header.index("`torch_impl/`")}
    named: dict[str, set[str]] = {tree: set() for tree in columns}
    for row in rows[2:]:  # after the header and its rule
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        for tree, i in columns.items():
            named[tree] |= set(re.findall(r"`([A-Za-z_0-9]+\.py)`", cells[i]))
    return named


@pytest.mark.parametrize("tree", ["numpy_ref", "torch_impl"])
def test_the_concept_map_places_every_module(tree):
    named = concept_map_columns()[tree]
    modules = {p.name for p in (ROOT / tree).glob("*.py") if p.name != "__init__.py"}
    missing, stale = sorted(modules - named), sorted(named - modules)
    assert not missing, f"README's concept map names no row for {tree}/{', '.join(missing)}"
    assert not stale, f"README's concept map names {tree} files that do not exist: {stale}"
