"""The bench scripts are run as files (``python bench/x.py``), not imported as a package: load them by path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def load_bench():
    """``load_bench("scaling")`` imports ``bench/scaling.py`` (its sibling imports resolve from ``bench/``)."""
    sys.path.insert(0, str(BENCH))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module

    yield load
    sys.path.remove(str(BENCH))
