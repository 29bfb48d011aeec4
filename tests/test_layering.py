"""The layers import downwards only: the model layer knows no Lightning; the Lightning layer registers strategies."""

from __future__ import annotations

import subprocess
import sys

import pytest


def imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


@pytest.mark.parametrize("statement", ["import cornstarch", "import cornstarch.models", "import cornstarch.batch"])
def test_model_layer_imports_no_lightning(statement):
    modules = imported_after(statement)
    assert "cornstarch.models" in modules or statement.endswith("batch")
    assert not {m for m in modules if m.split(".")[0] in ("lightning", "pytorch_lightning")}
    assert not {m for m in modules if m.startswith(("cornstarch.lit", "cornstarch.data"))}


def test_importing_the_lightning_layer_registers_the_strategies():
    code = ("import cornstarch.lit; from lightning.pytorch.strategies import StrategyRegistry; "
            "print('fsdp2' in StrategyRegistry, 'fsdp1' in StrategyRegistry)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True"]
