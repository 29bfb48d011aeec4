"""The digit images: scikit-learn's bundled digits, upscaled to RGB."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from cornstarch.demo import digits_images
from tests.demo.helpers import N_DIGITS, pixels


def test_digits_images_match_sklearn():
    images, labels = digits_images(size=24)
    reference = load_digits()
    assert len(images) == N_DIGITS and labels.tolist() == reference.target.tolist()
    for k in (0, 5, 1000, N_DIGITS - 1):
        assert images[k].mode == "RGB" and images[k].size == (24, 24)
        rgb = pixels(images[k])
        assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all()
        expected = np.rint(reference.images[k] * 255 / 16).astype(np.uint8)
        assert (rgb[::3, ::3, 0] == expected).all()  # nearest upscaling by 3: every 3rd pixel is a source pixel
    smooth, _ = digits_images(size=24, resample="bilinear")
    assert not (pixels(smooth[0]) == pixels(images[0])).all()
    with pytest.raises(ValueError, match="unknown resample 'blurry'"):
        digits_images(resample="blurry")
