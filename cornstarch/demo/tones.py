"""DTMF tones: the two sine waves a phone keypad plays for a digit, synthesised."""

from __future__ import annotations

import numpy as np

__all__ = ["DTMF_FREQUENCIES", "dtmf_tone"]

# (row, column) frequencies in Hz of the phone keypad: 1 2 3 / 4 5 6 / 7 8 9 / * 0 #.
DTMF_FREQUENCIES = {
    1: (697, 1209), 2: (697, 1336), 3: (697, 1477),
    4: (770, 1209), 5: (770, 1336), 6: (770, 1477),
    7: (852, 1209), 8: (852, 1336), 9: (852, 1477),
    0: (941, 1336),
}


def dtmf_tone(
    digit: int, sampling_rate: int = 16000, duration: float = 0.25, seed: int | None = None
) -> np.ndarray:
    """The DTMF tone of a phone keypad digit: the sum of its row and column sine waves.

    Without ``seed`` the tone is clean: two sines of amplitude 0.5, zero phase. With ``seed`` each sine gets a
    random amplitude in [0.35, 0.5] and phase, and Gaussian noise (std 0.01) is added; the same seed gives the
    same samples.

    Args:
        digit: 0..9 (frequencies in :data:`DTMF_FREQUENCIES`).
        sampling_rate: Samples per second; must exceed twice the highest DTMF frequency (1477 Hz).
        duration: Length in seconds.
        seed: Seed of the amplitude/phase/noise jitter, or ``None`` for a clean tone.

    Returns:
        ``float32`` array of ``round(sampling_rate * duration)`` samples in [-1, 1].

    Raises:
        ValueError: digit outside 0..9, or too low a sampling rate.

    >>> tone = dtmf_tone(7, sampling_rate=8000, duration=0.1)
    >>> tone.dtype, tone.shape
    (dtype('float32'), (800,))
    """
    if digit not in DTMF_FREQUENCIES:
        raise ValueError(f"DTMF digit must be an int in 0..9, got {digit!r}")
    if sampling_rate <= 2 * max(max(pair) for pair in DTMF_FREQUENCIES.values()):
        raise ValueError(f"sampling_rate {sampling_rate} is below the Nyquist rate of the DTMF tones (> 2954 Hz)")
    t = np.arange(round(sampling_rate * duration)) / sampling_rate
    freqs = np.array(DTMF_FREQUENCIES[digit], dtype=np.float64)[:, None]
    if seed is None:
        amplitudes, phases, noise = 0.5, 0.0, 0.0
    else:
        rng = np.random.default_rng(seed)
        amplitudes = rng.uniform(0.35, 0.5, size=(2, 1))
        phases = rng.uniform(0, 2 * np.pi, size=(2, 1))
        noise = rng.normal(0, 0.01, size=t.shape)
    tone = (amplitudes * np.sin(2 * np.pi * freqs * t + phases)).sum(axis=0) + noise
    return np.clip(tone, -1, 1).astype(np.float32)
