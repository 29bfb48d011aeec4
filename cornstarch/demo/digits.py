"""scikit-learn's bundled 8×8 handwritten digits (``load_digits``: 1797 images, pixel values 0..16) as RGB images,
and the one-pixel shifts used to augment them."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import PIL.Image
from sklearn.datasets import load_digits

__all__ = ["NUDGES", "digits_images"]

# One-pixel shifts of the 8×8 digits (scikit-learn's "nudge" augmentation): the original first, then 4 shifts.
NUDGES = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1))


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: pixels ``[1797, 8, 8]`` (0..16) and labels ``[1797]``, read-only."""
    bunch = load_digits()
    pixels, labels = bunch.images, bunch.target.astype(np.int64)
    pixels.setflags(write=False)
    labels.setflags(write=False)
    return pixels, labels


def _resampling(resample: str | int) -> int:
    if isinstance(resample, str):
        try:
            return PIL.Image.Resampling[resample.upper()]
        except KeyError:
            valid = [r.name.lower() for r in PIL.Image.Resampling]
            raise ValueError(f"unknown resample {resample!r}; valid: {valid}") from None
    return resample


def _to_image(pixels: np.ndarray, size: int, resample: str | int) -> PIL.Image.Image:
    gray = PIL.Image.fromarray(np.rint(pixels * (255 / 16)).astype(np.uint8))  # 2-D uint8: mode "L"
    return gray.resize((size, size), _resampling(resample)).convert("RGB")


def _shift(pixels: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``pixels`` moved by ``(dy, dx)`` with zeros filled in (nothing wraps around).

    >>> _shift(np.arange(1, 5).reshape(2, 2), 0, 1).tolist()
    [[0, 1], [0, 3]]
    """
    out = np.zeros_like(pixels)
    h, w = pixels.shape
    out[max(dy, 0): h + min(dy, 0), max(dx, 0): w + min(dx, 0)] = pixels[max(-dy, 0): h - max(dy, 0),
                                                                          max(-dx, 0): w - max(dx, 0)]
    return out


def digits_images(size: int = 32, resample: str | int = "nearest") -> tuple[list[PIL.Image.Image], np.ndarray]:
    """All 1797 bundled scikit-learn digits as RGB images (white ink on black), with their labels.

    Args:
        size: Side of the square output images in pixels (the source is 8×8).
        resample: PIL resampling filter, by name (``"nearest"``, ``"bilinear"``, ``"bicubic"``, …) or value.

    Returns:
        ``(images, labels)``: a list of ``size``×``size`` RGB ``PIL.Image`` and an ``int64`` array of digits 0..9.

    Raises:
        ValueError: unknown ``resample`` name.

    >>> images, labels = digits_images(16)
    >>> len(images), images[0].size, images[0].mode, int(labels[0])
    (1797, (16, 16), 'RGB', 0)
    """
    pixels, labels = _digits()
    return [_to_image(p, size, resample) for p in pixels], labels.copy()
