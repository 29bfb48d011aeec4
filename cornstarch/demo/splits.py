"""The deterministic, disjoint train/validation split of the 1797 digits."""

from __future__ import annotations

import numpy as np

from .digits import _digits

__all__ = ["SPLITS", "digits_split"]

SPLITS = ("train", "validation")
_SPLIT_ALIASES = {"val": "validation"}


def _canonical_split(split: str, val_fraction: float) -> str:
    """The split's name in :data:`SPLITS` (``"val"`` is accepted for ``"validation"``), after checking both.

    >>> _canonical_split("val", 0.2)
    'validation'
    """
    split = _SPLIT_ALIASES.get(split, split)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {list(SPLITS)} (or 'val')")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    return split


def digits_split(split: str = "train", val_fraction: float = 0.2, seed: int = 0) -> np.ndarray:
    """Indices (into the 1797 bundled digits) of one split: a seeded permutation cut into validation (the first
    ``round(1797 * val_fraction)``) and train (the rest), each returned sorted. The splits are disjoint and together
    cover every digit image.

    Args:
        split: ``"train"`` or ``"validation"`` (alias ``"val"``).
        val_fraction: Share of the images held out for validation, in (0, 1).
        seed: Seed of the permutation.

    Returns:
        Sorted ``int64`` index array.

    Raises:
        ValueError: unknown split or ``val_fraction`` outside (0, 1).

    >>> len(digits_split("train")), len(digits_split("validation"))
    (1438, 359)
    """
    split = _canonical_split(split, val_fraction)
    n = len(_digits()[1])
    order = np.random.default_rng(seed).permutation(n)
    n_val = round(n * val_fraction)
    return np.sort(order[:n_val] if split == "validation" else order[n_val:])
