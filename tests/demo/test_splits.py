"""The train/validation split of the digits."""

from __future__ import annotations

import numpy as np
import pytest

from cornstarch.demo import digits_split
from tests.demo.helpers import N_DIGITS


def test_splits_are_disjoint_complete_and_seeded():
    train, val = digits_split("train"), digits_split("validation")
    assert len(val) == round(N_DIGITS * 0.2) and len(train) + len(val) == N_DIGITS
    assert not set(train) & set(val) and set(train) | set(val) == set(range(N_DIGITS))
    assert np.array_equal(val, digits_split("validation")) and np.array_equal(val, digits_split("val"))
    assert not np.array_equal(val, digits_split("validation", seed=1))
    assert len(digits_split("validation", val_fraction=0.5)) == round(N_DIGITS * 0.5)
    with pytest.raises(ValueError, match="unknown split 'test'"):
        digits_split("test")
    with pytest.raises(ValueError, match="val_fraction"):
        digits_split("train", val_fraction=1.0)
