"""notebooks/quickstart.ipynb runs top to bottom and shows what it promises."""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs_and_learns(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # the kernel imports this checkout's cornstarch (not whichever one the venv has installed)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(NOTEBOOK.parents[1]), os.environ.get("PYTHONPATH", "")]))
    # "python3" is ipykernel's native kernel: this interpreter (the project's venv)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    texts = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    first, last = map(float, re.search(r"first loss ([\d.]+), last loss ([\d.]+)", texts).groups())
    assert last < first / 2, texts
    assert len(re.findall(r"model: .* truth: \w+", texts)) == 6
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2, "the loss plot and the images with the model's answers"
