"""DTMF tones: spectrum, seeded jitter and argument checks."""

from __future__ import annotations

import numpy as np
import pytest

from cornstarch.demo import DTMF_FREQUENCIES, dtmf_tone
from tests.demo.helpers import peak_frequencies


@pytest.mark.parametrize("sampling_rate", [16000, 8000])
@pytest.mark.parametrize("seed", [None, 3])
def test_dtmf_spectrum_peaks_at_the_two_keypad_frequencies(sampling_rate, seed):
    for digit, frequencies in DTMF_FREQUENCIES.items():
        tone = dtmf_tone(digit, sampling_rate=sampling_rate, seed=seed)
        assert tone.dtype == np.float32 and tone.shape == (sampling_rate // 4,)
        assert np.abs(tone).max() <= 1.0
        assert np.allclose(peak_frequencies(tone, sampling_rate), frequencies, atol=2)
    assert DTMF_FREQUENCIES[0] == (941, 1336)
    assert len(set(DTMF_FREQUENCIES.values())) == 10


def test_dtmf_seed_jitters_deterministically():
    clean = dtmf_tone(5, duration=0.1)
    t = np.arange(1600) / 16000
    expected = 0.5 * np.sin(2 * np.pi * 770 * t) + 0.5 * np.sin(2 * np.pi * 1336 * t)
    assert np.allclose(clean, expected, atol=1e-6)
    a, b, c = (dtmf_tone(5, duration=0.1, seed=s) for s in (1, 1, 2))
    assert np.array_equal(a, b) and not np.allclose(a, c) and not np.allclose(a, clean)


@pytest.mark.parametrize("digit", [10, -1, "7", 3.5])
def test_dtmf_rejects_non_digits(digit):
    with pytest.raises(ValueError, match="DTMF digit"):
        dtmf_tone(digit)


def test_dtmf_rejects_too_low_sampling_rate():
    with pytest.raises(ValueError, match="Nyquist"):
        dtmf_tone(1, sampling_rate=2954)
