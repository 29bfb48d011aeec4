"""The video demo task: real MP4 clips that decode to the digits named in the answer, in order, frames of several
sizes, validation clips made of held-out digit images, written once and reused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cornstarch.data.video import load_video
from cornstarch.demo import DIGIT_NAMES, VIDEO_QUESTION, digits_split, digits_video_dataset
from cornstarch.demo.clips import FRAME_SIZES, _clips, _frame
from cornstarch.demo.digits import NUDGES, _digits, _shift


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CORNSTARCH_CACHE", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("split", ["train", "validation"])
def test_clips_show_the_answers_digits_in_order(cache, split, no_network):
    rows = digits_video_dataset(split, n=24)
    plans = _clips(split, 24, 0.2, 0, 2, 4)
    pixels, labels = _digits()
    held_out = set(digits_split("validation").tolist())
    sizes = set()
    for row, plan in zip(rows, plans):
        user, assistant = row["messages"]
        assert user["content"] == VIDEO_QUESTION
        assert assistant["content"] == " ".join(DIGIT_NAMES[labels[i]] for i in plan["images"])
        assert 2 <= len(row["digits"]) <= 4 and row["digits"] == [int(labels[i]) for i in plan["images"]]
        if split == "validation":
            assert set(plan["images"]) <= held_out and plan["shifts"] == [0] * len(plan["images"])
        frames = load_video(row["videos"][0], index=0)
        expected = np.stack([_frame(_shift(pixels[i], *NUDGES[s]), *plan["size"])
                             for i, s in zip(plan["images"], plan["shifts"]) for _ in range(2)])
        assert frames.shape == expected.shape
        assert np.abs(frames.astype(int) - expected).mean() < 2  # H.264, near lossless
        sizes.add(frames.shape[1:3])
    assert sizes == set(FRAME_SIZES)
    if split == "train":
        assert not set(i for p in plans for i in p["images"]) & held_out


def test_clips_are_written_once_and_n_takes_a_prefix(cache):
    first = digits_video_dataset("validation", n=6)
    path = Path(first[0]["videos"][0])
    assert path.is_relative_to(cache)
    stamp = path.stat().st_mtime_ns
    again = digits_video_dataset("validation", n=4)
    assert again["messages"] == first["messages"][:4] and again["videos"] == first["videos"][:4]
    assert path.stat().st_mtime_ns == stamp
