"""The guide stays true: every test a docs page names exists, and every code block it quotes
from monotile is still in the source."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").rglob("*.md"))


def test_there_are_principle_pages():
    assert {p.name for p in PAGES} >= {"attention.md", "normalisation.md", "positions.md",
                                       "objective.md"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_named_test_exists(page):
    for path, name in re.findall(r"(tests/test_\w+\.py)::(test_\w+)", page.read_text()):
        source = (ROOT / path).read_text()
        assert re.search(rf"^def {name}\(", source, re.M), f"{page.name}: {path}::{name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_quoted_code_line_is_in_the_source(page):
    source = "\n".join(p.read_text() for p in (ROOT / "monotile").rglob("*.py"))
    for block in re.findall(r"```python\n(.*?)```", page.read_text(), re.S):
        for line in block.strip().splitlines():
            assert line.strip() in source, f"{page.name}: {line.strip()!r}"
