"""The bench scripts write their measured tables into BENCHMARKS.md without touching what surrounds them."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from benchlib import replace_marked, replace_section  # noqa: E402


def test_replace_marked_keeps_the_text_around_the_markers(tmp_path):
    page = tmp_path / "B.md"
    page.write_text("# B\n\nby hand\n<!-- t:begin -->\nold | table\n<!-- t:end -->\n\nafter, by hand\n")
    replace_marked(page, "t", "\nnew | table\n")
    assert page.read_text() == "# B\n\nby hand\n<!-- t:begin -->\nnew | table\n<!-- t:end -->\n\nafter, by hand\n"
    with pytest.raises(SystemExit, match="no <!-- other:begin -->"):
        replace_marked(page, "other", "x")


def test_replace_section_replaces_up_to_the_next_heading_or_appends(tmp_path):
    page = tmp_path / "B.md"
    page.write_text("# B\n\n## One\nold\n\n## Two\nkept\n")
    replace_section(page, "One", "## One\nnew\n")
    assert page.read_text() == "# B\n\n## One\nnew\n\n## Two\nkept\n"
    replace_section(page, "Three", "## Three\nadded")
    assert page.read_text().endswith("## Two\nkept\n\n## Three\nadded\n")


def test_benchmarks_md_has_the_places_the_scripts_write_to():
    text = (ROOT / "BENCHMARKS.md").read_text()
    assert "<!-- budgets-table:begin -->" in text and "<!-- budgets-table:end -->" in text  # bench/budgets.py
    assert "\n## Precision\n" in text  # bench/precision.py
