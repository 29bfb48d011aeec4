"""Load one modality item (an image or an audio clip) from whatever a dataset row holds, with clear errors."""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".ogg", ".aiff", ".aif"})


class SampleError(ValueError):
    """A bad sample: the message names the sample index and the field."""

    def __init__(self, index: Any, field: str, problem: str):
        super().__init__(f"Sample {index}, field {field!r}: {problem}")
        self.index, self.field = index, field


def _resolve(path: str, base_dir: str | None) -> str:
    return path if os.path.isabs(path) or base_dir is None else os.path.join(base_dir, path)


def _check_file(path: str, extensions: frozenset[str], kind: str, index: Any, field: str) -> None:
    ext = os.path.splitext(path)[1].lower()
    if ext not in extensions:
        raise SampleError(index, field, f"unsupported {kind} file type {ext or '(none)'!r} in {path!r}; "
                                        f"supported: {', '.join(sorted(extensions))}.")
    if not os.path.isfile(path):
        raise SampleError(index, field, f"{kind} file not found: {path!r}.")


def load_image(value: Any, index: Any, field: str = "images", base_dir: str | None = None) -> Image.Image:
    """An RGB PIL image from a PIL image, a file path, ``{"path"|"bytes": ...}`` or an ``[H, W(, C)]`` array.

    Raises:
        SampleError: for a missing, corrupt or unsupported file, or a value of another type.

    >>> load_image(np.zeros((4, 4), dtype=np.uint8), index=0).size
    (4, 4)
    """
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, (str, os.PathLike)):
            path = _resolve(os.fspath(value), base_dir)
            _check_file(path, IMAGE_EXTENSIONS, "image", index, field)
            image = Image.open(path)
        elif isinstance(value, np.ndarray):
            image = Image.fromarray(value)
        else:
            raise SampleError(index, field, f"cannot read an image from a {type(value).__name__}.")
        return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise SampleError(index, field, f"corrupt or unreadable image ({err}).") from err


def load_audio(value: Any, index: Any, field: str = "audios", sampling_rate: int = 16000,
               base_dir: str | None = None) -> np.ndarray:
    """A mono float32 waveform at ``sampling_rate`` from an array, a file path or ``{"array", "sampling_rate"}``.

    Files are decoded with ``soundfile`` (no FFmpeg needed); other rates are resampled.

    Raises:
        SampleError: for a missing, corrupt or unsupported file, or a value of another type.

    >>> load_audio([0.0, 0.5, -0.5], index=0).dtype
    dtype('float32')
    """
    rate = sampling_rate
    if isinstance(value, dict):
        rate = int(value.get("sampling_rate") or sampling_rate)
        value = value["array"] if value.get("array") is not None else value.get("path")
    if isinstance(value, (str, os.PathLike)):
        import soundfile

        path = _resolve(os.fspath(value), base_dir)
        _check_file(path, AUDIO_EXTENSIONS, "audio", index, field)
        try:
            value, rate = soundfile.read(path, dtype="float32", always_2d=False)
        except (RuntimeError, soundfile.LibsndfileError) as err:
            raise SampleError(index, field, f"corrupt or unreadable audio ({err}).") from err
    elif not isinstance(value, (np.ndarray, list, tuple)):
        raise SampleError(index, field, f"cannot read audio from a {type(value).__name__}.")
    wave = np.asarray(value, dtype=np.float32)
    if wave.ndim == 2:
        wave = wave.mean(axis=1)  # [frames, channels] → mono
    if wave.ndim != 1 or wave.size == 0:
        raise SampleError(index, field, f"audio must be a non-empty 1-D waveform, got shape {wave.shape}.")
    if rate != sampling_rate:
        from scipy.signal import resample_poly

        wave = resample_poly(wave, sampling_rate, rate).astype(np.float32)
    return wave
