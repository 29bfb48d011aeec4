"""Sources of a split: a ``"module:function"``, an in-memory dataset, and where relative media paths start."""

from __future__ import annotations

import os

from datasets import Dataset

from cornstarch.data import DatasetSpec
from cornstarch.data.sources import load_split, media_dir


def numbers(split: str, count: int = 5) -> Dataset:
    """A ``"module:function"`` source: ``count`` samples naming their split."""
    return Dataset.from_dict({"prompt": [f"{split} {i}" for i in range(count)], "answer": ["seven"] * count})


def test_module_function_gets_the_split_and_kwargs_and_is_limited():
    spec = DatasetSpec("tests.data.test_sources:numbers", split="val", limit=2, kwargs={"count": 4})
    assert load_split(spec)["prompt"] == ["val 0", "val 1"]


def test_in_memory_split_is_taken_as_it_is_and_media_paths_follow_the_first_data_file(tmp_path):
    data = Dataset.from_dict({"prompt": ["which digit ?"], "answer": ["seven"]})
    assert load_split(data) is data and media_dir(data) is None and media_dir(None) is None
    first = os.path.join(tmp_path, "a", "train.jsonl")
    assert media_dir(DatasetSpec("json", data_files={"train": [first, "b.jsonl"]})) == os.path.join(tmp_path, "a")
    assert media_dir(DatasetSpec("imagefolder", data_dir="pics")) == "pics"
