"""The demo tasks written as files load back, offline, as the same rows."""

from __future__ import annotations

import json

import datasets
import numpy as np
import PIL.Image
import soundfile

from cornstarch.demo import digits_valm_dataset, digits_vlm_dataset, write_demo_files
from tests.demo.helpers import pixels


def test_written_files_load_back_offline(tmp_path, no_network):
    n = 12
    split_dir = write_demo_files(tmp_path, split="validation", n=n)
    assert split_dir == tmp_path / "validation"
    expected_vlm = digits_vlm_dataset("validation", n=n)
    expected_valm = digits_valm_dataset("validation", n=n)
    cache = str(tmp_path / "hf-cache")

    data = datasets.load_dataset("json", data_files=str(split_dir / "data.jsonl"), split="train", cache_dir=cache)
    assert len(data) == n and data["messages"] == expected_valm["messages"]
    for row, expected in zip(data, expected_valm):
        assert row["image_label"] == expected["image_label"] and row["audio_label"] == expected["audio_label"]
        with PIL.Image.open(split_dir / row["images"][0]) as image:
            assert (pixels(image) == pixels(expected["images"][0])).all()
        audio, rate = soundfile.read(split_dir / row["audios"][0], dtype="float32")
        assert rate == row["sampling_rate"] == 16000 and np.array_equal(audio, expected["audios"][0])

    vision = datasets.load_dataset("json", data_files=str(split_dir / "vision.jsonl"), split="train",
                                   cache_dir=cache)
    assert vision["messages"] == expected_vlm["messages"] and vision["label"] == expected_vlm["label"]
    assert vision["images"] == data["images"]

    folder = datasets.load_dataset("imagefolder", data_dir=str(split_dir / "images"), split="train",
                                   cache_dir=cache)
    assert folder["messages"] == expected_vlm["messages"] and folder["label"] == expected_vlm["label"]
    for row, expected in zip(folder, expected_vlm):
        assert (pixels(row["image"]) == pixels(expected["images"][0])).all()
    metadata = [json.loads(line) for line in (split_dir / "images" / "metadata.jsonl").read_text().splitlines()]
    assert [m["file_name"] for m in metadata] == [f"{k:05d}.png" for k in range(n)]
