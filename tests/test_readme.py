"""The README's quickstart runs as written."""

from __future__ import annotations

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
