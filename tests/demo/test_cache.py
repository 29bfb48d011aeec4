"""Where the demo artefacts are cached."""

from __future__ import annotations

from cornstarch.demo import demo_root


def test_demo_root_default(monkeypatch):
    monkeypatch.delenv("CORNSTARCH_CACHE", raising=False)
    monkeypatch.setenv("HOME", "/home/someone")
    assert str(demo_root()) == "/home/someone/.cache/cornstarch"


def test_demo_root_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CORNSTARCH_CACHE", str(tmp_path / "cache"))
    assert demo_root() == tmp_path / "cache"
    assert not (tmp_path / "cache").exists()  # named, not created
