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


SHAPES = {  # the models docs/scaling.md sizes
    "gpt2-small": (dict(vocab_size=50257, n_layer=12, n_head=12, d_model=768, context=1024,
                        mlp="gelu_tanh", bias=True), 16, 1024),
    "llama-1b": (dict(vocab_size=128256, n_layer=16, n_head=32, n_kv_head=8, d_model=2048,
                      d_ff=8192, context=2048, bias=False, norm="rmsnorm", mlp="swiglu",
                      positions="rope"), 8, 2048),
}


def test_the_scaling_tables_are_what_the_function_computes():
    import torch

    from monotile.core.transformer import ModelConfig
    from monotile.modalities.text import LanguageModel
    from monotile.train.distributed import strategy_table
    page = (ROOT / "docs" / "scaling.md").read_text()
    tables = re.findall(r"<!-- memory table: ([\w-]+), batch \d+ x \d+ -->\n((?:\|.*\n)+)", page)
    assert {name for name, _ in tables} == set(SHAPES)
    for name, table in tables:
        shape, batch, context = SHAPES[name]
        with torch.device("meta"):
            model = LanguageModel(ModelConfig(**shape))
        assert table.strip() == strategy_table(model, (1, 2, 8), batch=batch, context=context)
