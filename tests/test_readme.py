"""The README's quickstart runs as written."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has a python quickstart block"
    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile(blocks[0], "README-quickstart", "exec"), namespace)
    tokens = namespace["tokens"]
    assert tokens.shape == (1, 23 + 4)
    assert torch.equal(tokens[:, :23], namespace["input_ids"])
    assert {p.requires_grad for p in namespace["mllm"].language_model.parameters()} == {False}


def test_the_variable_resolution_table_names_the_tested_towers_processors_and_budgets():
    """Each row of the README's variable-resolution table is a family that the tests run (one parameter per row),
    with that test's tower class, image processor class and budget fields."""
    from cornstarch.models.pixel_budgets import pixel_budget
    from tests.models.test_dynamic_resolution import FAMILIES, image_processor, native

    header = "| family | tower | image processor | budget | features per image |"
    text = README.read_text()
    assert header in text
    lines = itertools.takewhile(lambda line: line.startswith("|"), text[text.index(header):].splitlines()[2:])
    rows = [[cell.strip().strip("`") for cell in line.strip("|").split("|")] for line in lines]
    assert [row[0] for row in rows] == list(FAMILIES)
    for family, tower, processor, budget, _ in rows:
        module, _ = native(family)
        assert type(module).__name__ == tower.split("`")[0]
        assert type(image_processor(family)).__name__.removesuffix("Pil") == processor
        assert sorted(pixel_budget(image_processor(family))) == sorted(b.strip("` ") for b in budget.split(","))
