"""Helpers of the demo data tests: image pixels and the peaks of a tone's spectrum."""

from __future__ import annotations

import numpy as np

N_DIGITS = 1797  # scikit-learn's bundled digits


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def peak_frequencies(signal: np.ndarray, sampling_rate: int) -> list[int]:
    """The two strongest spectral peaks, in Hz (1 Hz bins by zero-padding to one second), at least 50 Hz apart."""
    spectrum = np.abs(np.fft.rfft(signal, n=sampling_rate))
    first = int(np.argmax(spectrum))
    spectrum[max(first - 50, 0):first + 50] = 0
    return sorted([first, int(np.argmax(spectrum))])
