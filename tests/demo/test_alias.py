"""``cornstarch.data.demo``, the deprecated alias of ``cornstarch.demo``, still provides the old names."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cornstarch.demo
from cornstarch.models.builder import build_tokenizer as load_tokenizer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def alias():
    with pytest.warns(DeprecationWarning, match="use cornstarch.demo"):
        return importlib.reload(importlib.import_module("cornstarch.data.demo"))


def test_alias_names_are_the_new_objects(alias):
    assert alias.build_tokenizer is cornstarch.demo.demo_tokenizer
    for name in cornstarch.demo.__all__:
        if name != "demo_tokenizer":
            assert getattr(alias, name) is getattr(cornstarch.demo, name), name
    assert set(alias.__all__) == set(cornstarch.demo.__all__) - {"demo_tokenizer"} | {"build_tokenizer"}
    for name in ("digits_vlm_dataset", "digits_valm_dataset", "write_demo_files", "dtmf_tone", "demo_root",
                 "IMAGE_PLACEHOLDER", "AUDIO_PLACEHOLDER"):
        assert name in alias.__all__


def test_old_config_paths_resolve_to_the_new_functions(alias, tmp_path, monkeypatch):
    """Configs that name ``cornstarch.data.demo:...`` load the same tokenizer and data as ``cornstarch.demo:...``."""
    monkeypatch.setenv("CORNSTARCH_CACHE", str(tmp_path))
    assert load_tokenizer("cornstarch.data.demo:build_tokenizer").get_vocab() == \
        load_tokenizer("cornstarch.demo:demo_tokenizer").get_vocab()
    old = alias.digits_vlm_dataset("validation", n=3)
    assert old["messages"] == cornstarch.demo.digits_vlm_dataset("validation", n=3)["messages"]


@pytest.mark.parametrize("package, other", [("cornstarch.data", "cornstarch.demo"), ("cornstarch.demo", "cornstarch.data")])
def test_the_data_layer_and_the_demo_import_each_other_not(package, other):
    code = f"import sys, {package}; print(sorted(m for m in sys.modules if m.startswith({other!r})))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
