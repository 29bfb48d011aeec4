"""The two demo tasks: rows agree with the source digits and tones, splits are disjoint, results deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from cornstarch.demo import (
    DIGIT_NAMES,
    DTMF_FREQUENCIES,
    IMAGE_PLACEHOLDER,
    digits_images,
    digits_split,
    digits_valm_dataset,
    digits_vlm_dataset,
)
from tests.demo.helpers import N_DIGITS, peak_frequencies, pixels


@pytest.fixture(scope="module")
def vlm_val():
    return digits_vlm_dataset("validation")


def test_vlm_rows_agree_with_the_source_digits(vlm_val):
    indices = digits_split("validation")
    images, labels = digits_images()
    assert len(vlm_val) == len(indices)
    assert vlm_val.features["label"].names == list(DIGIT_NAMES)
    assert vlm_val["label"] == labels[indices].tolist()
    for row, index in zip(vlm_val.select(range(0, len(vlm_val), 37)), indices[::37]):
        user, assistant = row["messages"]
        assert user == {"role": "user", "content": "<image>\nWhich digit is this?"}
        assert assistant == {"role": "assistant", "content": DIGIT_NAMES[row["label"]]}
        assert user["content"].count(IMAGE_PLACEHOLDER) == len(row["images"]) == 1
        assert (pixels(row["images"][0]) == pixels(images[index])).all()


def test_vlm_dataset_is_deterministic_and_n_takes_a_prefix(vlm_val):
    head = digits_vlm_dataset("validation", n=5)
    assert len(head) == 5
    for a, b in zip(head, vlm_val.select(range(5))):
        assert a["messages"] == b["messages"] and a["label"] == b["label"]
        assert (pixels(a["images"][0]) == pixels(b["images"][0])).all()
    other = digits_vlm_dataset("validation", seed=1, n=20, image_size=16)
    assert other[0]["images"][0].size == (16, 16)
    assert other["label"] != vlm_val["label"][:20]
    with pytest.raises(ValueError, match="n must be"):
        digits_vlm_dataset("validation", n=-1)
    assert digits_valm_dataset("validation", n=2).select_columns(["messages"])[0].keys() == {"messages"}


def test_vlm_train_and_validation_images_are_disjoint(vlm_val):
    train = digits_vlm_dataset("train")
    assert len(train) + len(vlm_val) == N_DIGITS
    seen = {pixels(row["images"][0]).tobytes() for row in train}
    assert not any(pixels(row["images"][0]).tobytes() in seen for row in vlm_val)


@pytest.fixture(scope="module")
def valm_val():
    return digits_valm_dataset("validation")


def test_valm_answer_names_image_digit_then_tone_digit(valm_val, vlm_val):
    assert valm_val["image_label"] == vlm_val["label"]
    for k in range(0, len(valm_val), 23):
        row = valm_val[k]
        user, assistant = row["messages"]
        assert user["content"] == "<image>\n<audio>\nWhich digits are shown and played?"
        assert assistant["content"] == f"{DIGIT_NAMES[row['image_label']]} {DIGIT_NAMES[row['audio_label']]}"
        assert (pixels(row["images"][0]) == pixels(vlm_val[k]["images"][0])).all()
        assert isinstance(row["audios"], list)
        (audio,) = row["audios"]
        assert audio.dtype == np.float32 and audio.shape == (4000,) and row["sampling_rate"] == 16000
        assert np.allclose(peak_frequencies(audio, 16000), DTMF_FREQUENCIES[row["audio_label"]], atol=2)


def test_valm_tone_digit_is_independent_of_the_image(valm_val):
    image, audio = np.array(valm_val["image_label"]), np.array(valm_val["audio_label"])
    assert set(audio.tolist()) == set(range(10))
    assert 0.03 < (image == audio).mean() < 0.2  # ~0.1 when independent; 1.0 if copied


def test_valm_dataset_is_deterministic():
    a, b = (digits_valm_dataset("train", n=8, sampling_rate=8000, duration=0.1) for _ in range(2))
    assert a["messages"] == b["messages"]
    assert all(np.array_equal(x["audios"][0], y["audios"][0]) for x, y in zip(a, b))
    assert [(x.dtype, x.shape) for x in a[0]["audios"]] == [(np.float32, (800,))]
    shuffled = a.shuffle(seed=0).select([0])[0]  # the transform survives shuffle/select
    assert isinstance(shuffled["audios"][0], np.ndarray) and shuffled["audios"][0].dtype == np.float32
