"""Load one modality item (an image or an audio clip) from whatever a dataset row holds, with clear errors.

Media the encoders cannot take as given are converted where the meaning is unambiguous, and the first conversion
of each kind in a process is reported as a :class:`SampleWarning` naming the sample: 16-bit (and other integer or
float) pixels are scaled to 8 bits, integer PCM audio is scaled to floats in [-1, 1], and multi-channel audio is
mixed down to mono (``[frames, channels]`` or, when the channels are clearly the short side, ``[channels,
frames]``). Values no conversion can save (NaN or infinite samples, an empty image, out-of-range pixels) raise a
:class:`SampleError` naming the sample and field.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".ogg", ".aiff", ".aif"})


MAX_CHANNELS = 8  # a 2-D waveform's side no longer than this (and shorter than the other) holds the channels


def sample_message(index: Any, field: str, problem: str) -> str:
    """The text of an error or warning about one sample's field.

    >>> sample_message(3, "images", "the image is empty.")
    "Sample 3, field 'images': the image is empty."
    """
    return f"Sample {index}, field {field!r}: {problem}"


class SampleError(ValueError):
    """A bad sample: the message names the sample index and the field."""

    def __init__(self, index: Any, field: str, problem: str):
        super().__init__(sample_message(index, field, problem))
        self.index, self.field = index, field


class SampleWarning(UserWarning):
    """A sample the data layer converted, or whose media an encoder will cut: the message names the sample."""


_NOTED: set[str] = set()  # conversion kinds already reported in this process


def note_once(kind: str, index: Any, field: str, what: str) -> None:
    """Report a media conversion as a :class:`SampleWarning` the first time one of its ``kind`` happens.

    Args:
        kind: the kind of conversion (later conversions of this kind are not reported again).
        index, field: the sample and field converted first, named in the message.
        what: what was done.
    """
    if kind in _NOTED:
        return
    _NOTED.add(kind)
    warnings.warn(sample_message(index, field, f"{what} (reported once: later items are converted the same way)."),
                  SampleWarning, stacklevel=3)


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

    8-bit images are used as they are. Other pixel depths are scaled to 8 bits, the first time reported by a
    :class:`SampleWarning`: 16-bit images (``uint16`` arrays, PIL modes ``I;16*``, 16-bit grayscale PNGs) by
    ``value / 257``; other integer arrays (and PIL mode ``I``) as 8-bit values if they lie in [0, 255], else as
    16-bit ones if they lie in [0, 65535]; float arrays (and PIL mode ``F``) as ``value × 255`` if they lie in
    [0, 1], else rounded if they lie in [0, 255].

    Raises:
        SampleError: for a missing, corrupt or unsupported file, a value of another type, an empty (0-pixel)
            image, NaN or infinite pixels, pixel values outside those ranges, or an array of another shape.

    >>> load_image(np.zeros((4, 4), dtype=np.uint8), index=0).size
    (4, 4)
    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     load_image(np.full((2, 2), 65535, dtype=np.uint16), index=0).getpixel((0, 0))
    (255, 255, 255)
    """
    try:
        image = _opened(value, index, field, base_dir)
        if isinstance(image, np.ndarray):
            image = _array_image(image, index, field)
        if image.mode in ("I", "F") or image.mode.startswith("I;16"):  # not 8-bit: convert("RGB") would clip
            image = _array_image(np.asarray(image), index, field)
        return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise SampleError(index, field, f"corrupt or unreadable image ({err}).") from err


def image_size(value: Any, index: Any, field: str = "images", base_dir: str | None = None) -> tuple[int, int]:
    """``(width, height)`` of an image :func:`load_image` would load, read from its header: no pixel is decoded.

    Raises:
        SampleError: for a missing or unsupported file, a file whose header cannot be read, a value of another
            type, an empty image, or an unusable array (a file's pixels are checked when the image is loaded).

    >>> image_size(np.zeros((4, 6, 3), dtype=np.uint8), index=0)
    (6, 4)
    """
    try:
        image = _opened(value, index, field, base_dir)
    except (UnidentifiedImageError, OSError) as err:
        raise SampleError(index, field, f"corrupt or unreadable image ({err}).") from err
    return (_array_image(image, index, field) if isinstance(image, np.ndarray) else image).size


def _opened(value: Any, index: Any, field: str, base_dir: str | None) -> "Image.Image | np.ndarray":
    """The image of ``value`` opened lazily (PIL reads the header only), or the array itself; empty images refused."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
    elif isinstance(value, (str, os.PathLike)):
        path = _resolve(os.fspath(value), base_dir)
        _check_file(path, IMAGE_EXTENSIONS, "image", index, field)
        image = Image.open(path)
    elif isinstance(value, np.ndarray):
        return value
    else:
        raise SampleError(index, field, f"cannot read an image from a {type(value).__name__}.")
    if 0 in image.size:
        raise SampleError(index, field, f"the image is empty ({image.size[0]}×{image.size[1]} pixels); "
                                        f"fix or drop this item.")
    return image


def _array_image(array: np.ndarray, index: Any, field: str) -> Image.Image:
    """An ``[H, W]`` or ``[H, W, 1|3|4]`` array of any pixel depth → an 8-bit PIL image (see :func:`load_image`)."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or array.ndim == 3 and array.shape[2] in (3, 4)):
        raise SampleError(index, field, f"a pixel array of shape {list(array.shape)}; expected [height, width] or "
                                        f"[height, width, channels] with 1, 3 or 4 channels (channels last).")
    if array.size == 0:
        raise SampleError(index, field, f"the image is empty (array of shape {list(array.shape)}); fix or drop "
                                        f"this item.")
    return Image.fromarray(_to_uint8(array, index, field))


def _to_uint8(array: np.ndarray, index: Any, field: str) -> np.ndarray:
    """Pixels of any integer or float type → ``uint8``, scaled as :func:`load_image` describes."""
    kind = array.dtype.kind
    if array.dtype == np.uint8:
        return array
    if kind == "b":
        return array.astype(np.uint8) * 255
    if kind == "f" and not np.isfinite(array).all():
        raise SampleError(index, field, f"{int(np.size(array) - np.isfinite(array).sum())} pixel value(s) are NaN "
                                        f"or infinite; fix or drop this image.")
    if kind not in "iuf":
        raise SampleError(index, field, f"cannot read pixels of dtype {array.dtype}.")
    low, high = array.min(), array.max()
    sixteen_bit = kind == "u" and array.dtype.itemsize == 2
    if kind in "iu" and not sixteen_bit and low >= 0 and high <= 255:
        return array.astype(np.uint8)
    if kind in "iu" and low >= 0 and high <= 65535:
        note_once("image16", index, field, f"16-bit pixels ({array.dtype}) scaled to 8 bits (value / 257)")
        return np.rint(array / 257).astype(np.uint8)
    if kind == "f" and low >= 0 and high <= 1:
        note_once("image_unit", index, field, f"{array.dtype} pixels in [0, 1] scaled to 8 bits (value × 255)")
        return np.rint(array * 255.0).astype(np.uint8)
    if kind == "f" and low >= 0 and high <= 255:
        note_once("image_float", index, field, f"{array.dtype} pixels in [0, 255] rounded to 8 bits")
        return np.rint(array).astype(np.uint8)
    scales = "[0, 255] or [0, 65535]" if kind in "iu" else "[0, 1] or [0, 255]"
    raise SampleError(index, field, f"{array.dtype} pixel values span [{low}, {high}]; expected {scales}.")


def load_audio(value: Any, index: Any, field: str = "audios", sampling_rate: int = 16000,
               base_dir: str | None = None) -> np.ndarray:
    """A mono float32 waveform at ``sampling_rate`` from an array, a file path or ``{"array", "sampling_rate"}``.

    Files are decoded with ``soundfile`` (no FFmpeg needed); other rates are resampled. Arrays are converted,
    the first time reported by a :class:`SampleWarning`: integer PCM to floats in [-1, 1] (``int16`` ÷ 32768,
    ``int32`` ÷ 2³¹, ``int8`` ÷ 128, unsigned 8-bit centred on 128; other integer types, such as Python lists
    of ints, as 16-bit PCM if they fit, else 32-bit), and 2-D arrays mixed down to mono. A 2-D array is
    ``[frames, channels]``, or ``[channels, frames]`` when its first side is the shorter and holds at most
    :data:`MAX_CHANNELS`.

    Raises:
        SampleError: for a missing, corrupt or unsupported file, a value of another type, an empty or
            ragged array, one whose channels cannot be told from its frames, or NaN or infinite samples.

    >>> load_audio([0.0, 0.5, -0.5], index=0).dtype
    dtype('float32')
    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     stereo = np.array([[16384, -16384, 0], [16384, 0, 0]], dtype=np.int16)  # [2 channels, 3 frames]
    ...     load_audio(stereo, index=0).tolist()
    [0.5, -0.25, 0.0]
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
    try:
        wave = np.asarray(value)
    except ValueError as err:  # ragged nested lists
        raise SampleError(index, field, f"audio must be a 1-D waveform or a [frames, channels] array ({err}).") from err
    wave = _float_samples(wave, index, field)
    if wave.ndim == 2:
        wave = _mono(wave, index, field)
    if wave.ndim != 1 or wave.size == 0:
        raise SampleError(index, field, f"audio must be a non-empty 1-D waveform, got shape {wave.shape}.")
    finite = np.isfinite(wave)
    if not finite.all():
        raise SampleError(index, field, f"{int(wave.size - finite.sum())} of {wave.size} audio samples are NaN or "
                                        f"infinite (the first at sample {int(np.argmin(finite))}); fix or drop "
                                        f"this clip.")
    if rate != sampling_rate:
        from scipy.signal import resample_poly

        wave = resample_poly(wave, sampling_rate, rate).astype(np.float32)
    return wave


def _float_samples(wave: np.ndarray, index: Any, field: str) -> np.ndarray:
    """Audio samples as float32: floats as they are, integer PCM scaled to [-1, 1] (see :func:`load_audio`)."""
    kind = wave.dtype.kind
    if kind == "f":
        return wave.astype(np.float32, copy=False)
    if kind not in "iu":
        raise SampleError(index, field, f"cannot read audio samples of dtype {wave.dtype}.")
    if wave.size == 0:  # refused as empty by the caller
        return wave.astype(np.float32)
    if kind == "u" and wave.dtype.itemsize == 1:
        note_once("pcm", index, field, "unsigned 8-bit PCM scaled to floats in [-1, 1] ((value - 128) / 128)")
        return ((wave.astype(np.float32) - 128) / 128).astype(np.float32)
    bits = 8 * wave.dtype.itemsize if kind == "i" and wave.dtype.itemsize <= 4 else None
    if bits is None:  # another integer type (e.g. from a list of ints): the narrowest PCM width its values fit
        low, high = int(wave.min()), int(wave.max())
        bits = next((b for b in (16, 32) if -(2 ** (b - 1)) <= low and high < 2 ** (b - 1)), None)
        if bits is None:
            raise SampleError(index, field, f"integer audio samples span [{low}, {high}], beyond 32-bit PCM.")
    note_once("pcm", index, field, f"{wave.dtype} samples read as {bits}-bit PCM and scaled to floats in [-1, 1] "
                                   f"(value / {2 ** (bits - 1)})")
    return (wave / float(2 ** (bits - 1))).astype(np.float32)


def _mono(wave: np.ndarray, index: Any, field: str) -> np.ndarray:
    """A 2-D waveform mixed down to mono: ``[frames, channels]``, or ``[channels, frames]`` when unambiguous."""
    rows, columns = wave.shape
    if columns <= MAX_CHANNELS and rows > columns:
        note_once("mono", index, field, f"{columns}-channel audio ([frames, channels]) mixed down to mono")
        return wave.mean(axis=1)
    if rows <= MAX_CHANNELS and columns > rows:
        note_once("channels_first", index, field, f"a {rows}×{columns} audio array read as [channels, frames] "
                                                  f"({rows} channels) and mixed down to mono")
        return wave.mean(axis=0)
    raise SampleError(index, field, f"cannot tell channels from frames in a {rows}×{columns} audio array; give "
                                    f"[frames, channels] with at most {MAX_CHANNELS} channels.")
