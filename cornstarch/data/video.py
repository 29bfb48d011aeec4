"""Read one video item: frames decoded with PyAV (FFmpeg) and sampled uniformly by ``fps`` and/or ``max_frames``.

A video reaches a processor as an ``[frames, height, width, 3]`` ``uint8`` array. Files (``.mp4``, ``.mkv``,
``.webm``, ``.avi``, ``.mov``…) and in-memory bytes are decoded with PyAV, whose wheels ship FFmpeg; frames already
decoded can be given as an array or a list of images. Sampling follows transformers' video processors: from
``total`` frames at the video's own rate, ``fps`` keeps ``int(total / video_fps * fps)`` frames, ``max_frames``
at most that many, and the kept frames are spread uniformly (frame ``floor(i * total / n)`` for ``i < n``).

Anything that yields no frame is refused with a :class:`~cornstarch.data.media.SampleError` naming the sample and
field: a missing file, bytes FFmpeg cannot decode, a file without a video stream, an empty clip, or a sampling rate
too low for the clip's length.

>>> frames = np.zeros((10, 4, 6, 3), dtype=np.uint8)
>>> load_video(frames, index=0, max_frames=4).shape
(4, 4, 6, 3)
>>> frame_indices(total=10, video_fps=5.0, fps=2.0).tolist()  # 2 s at 5 fps, sampled at 2 fps: 4 frames
[0, 2, 5, 7]
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image

from ..models.video import check_sampling
from .media import SampleError, _check_file, _resolve, _to_uint8

__all__ = ["VIDEO_EXTENSIONS", "check_sampling", "frame_indices", "load_video"]

VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mkv", ".webm", ".avi", ".mov", ".mpg", ".mpeg", ".ogv", ".gif"})


def frame_indices(total: int, video_fps: float | None = None, fps: float | None = None,
                  max_frames: int | None = None) -> np.ndarray:
    """Indices of the frames kept out of ``total``: uniformly spread, ``fps`` per second and at most ``max_frames``.

    Args:
        total: frames in the clip.
        video_fps: the clip's own frame rate (needed with ``fps``).
        fps, max_frames: see :func:`~cornstarch.models.video.check_sampling`.

    Returns:
        ``int64`` indices, increasing; empty when the settings keep no frame (a clip shorter than ``1 / fps``).

    Raises:
        ValueError: for invalid settings, or ``fps`` without ``video_fps``.

    >>> frame_indices(total=6, max_frames=4).tolist()
    [0, 1, 3, 4]
    >>> frame_indices(total=3, video_fps=10.0, fps=1.0).tolist()  # 0.3 s at 1 frame per second: none
    []
    """
    check_sampling(fps, max_frames)
    keep = total
    if fps is not None:
        if not video_fps:
            raise ValueError("sampling by fps needs the video's own frame rate, which is unknown here.")
        keep = min(int(total / video_fps * fps), total)
    if max_frames is not None:
        keep = min(keep, max_frames)
    return np.floor(np.arange(keep) * (total / max(keep, 1))).astype(np.int64)


def load_video(value: Any, index: Any, field: str = "videos", base_dir: str | None = None, fps: float | None = None,
               max_frames: int | None = None) -> np.ndarray:
    """A video item's sampled frames, ``[frames, height, width, 3]`` ``uint8`` (RGB).

    Args:
        value: a file path, ``{"path"|"bytes": ...}``, the file's bytes, decoded frames (an ``[frames, height,
            width(, channels)]`` array or a list of images / ``[height, width(, channels)]`` arrays; pixels of any
            depth are scaled to 8 bits as :func:`~cornstarch.data.media.load_image` does), or
            ``{"frames": ..., "fps": rate}`` for decoded frames with their rate.
        index, field: the sample and field, named in errors.
        base_dir: directory relative paths are relative to.
        fps, max_frames: frame sampling (:func:`frame_indices`). Decoded frames given without their rate cannot be
            sampled by ``fps``.

    Returns:
        The kept frames, in order.

    Raises:
        SampleError: for a missing or unsupported file, data FFmpeg cannot decode, no video stream, no frame kept
            (an empty clip, or one shorter than ``1 / fps``), frames of different sizes, or ``fps`` asked of frames
            given without their rate.
        ValueError: for invalid ``fps`` / ``max_frames`` (:func:`~cornstarch.models.video.check_sampling`).

    >>> load_video([np.zeros((2, 2), dtype=np.uint8)] * 3, index=0).shape  # gray frames become RGB
    (3, 2, 2, 3)
    """
    check_sampling(fps, max_frames)
    rate = None
    if isinstance(value, dict):
        rate = value.get("fps")
        value = next((value[k] for k in ("frames", "bytes", "path") if value.get(k) is not None), None)
    if isinstance(value, (str, os.PathLike)):
        path = _resolve(os.fspath(value), base_dir)
        _check_file(path, VIDEO_EXTENSIONS, "video", index, field)
        return _decode(path, index, field, fps, max_frames)
    if isinstance(value, (bytes, bytearray)):
        return _decode(io.BytesIO(value), index, field, fps, max_frames)
    frames = _frames_array(value, index, field)
    if fps is not None and rate is None and len(frames):
        raise SampleError(index, field, f"frames given decoded carry no frame rate, so they cannot be sampled at "
                                        f"fps={fps}; give {{'frames': ..., 'fps': <their rate>}} or a video file.")
    return _select(frames, rate, index, field, fps, max_frames)


def _select(frames: Any, rate: float | None, index: Any, field: str, fps: float | None,
            max_frames: int | None) -> Any:
    """The sampled frames of a clip (a list or an array), refusing a clip that keeps none."""
    total = len(frames)
    if total == 0:
        raise SampleError(index, field, "the video has no frames (an empty clip); fix or drop this item.")
    if fps is not None and not rate:
        raise SampleError(index, field, f"the video's frame rate is unknown, so it cannot be sampled at fps={fps}; "
                                        f"sample by max_frames only, or give the frames with their rate.")
    kept = frame_indices(total, rate, fps, max_frames)
    if len(kept) == 0:
        raise SampleError(index, field, f"sampling keeps no frame of this {total}-frame clip ({total / rate:.3g} s "
                                        f"at {rate:.3g} fps): it is shorter than one frame at fps={fps}; raise fps "
                                        f"or drop this item.")
    return [frames[i] for i in kept.tolist()] if isinstance(frames, list) else frames[kept]


def _frames_array(value: Any, index: Any, field: str) -> np.ndarray:
    """Decoded frames (an array or a list of images/arrays) → ``[frames, height, width, 3]`` ``uint8``."""
    if isinstance(value, (list, tuple)):
        arrays = [np.asarray(f.convert("RGB")) if isinstance(f, Image.Image) else np.asarray(f) for f in value]
        if len({a.shape for a in arrays}) > 1:
            sizes = sorted({a.shape[:2] for a in arrays})
            raise SampleError(index, field, f"the frames have different sizes {sizes}; a video's frames share one "
                                            f"size.")
        value = np.stack(arrays) if arrays else np.zeros((0, 1, 1, 3), dtype=np.uint8)
    if not isinstance(value, np.ndarray):
        raise SampleError(index, field, f"cannot read a video from a {type(value).__name__}.")
    if value.ndim == 3:
        value = value[..., None]
    if value.ndim != 4 or value.shape[-1] not in (1, 3, 4):
        raise SampleError(index, field, f"frames of shape {list(value.shape)}; expected [frames, height, width] or "
                                        f"[frames, height, width, channels] with 1, 3 or 4 channels.")
    if value.shape[0] and 0 in value.shape[1:3]:
        raise SampleError(index, field, f"the frames are empty ({value.shape[2]}×{value.shape[1]} pixels).")
    frames = _to_uint8(value, index, field) if value.size else value.astype(np.uint8)
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    return frames[..., :3]


def _decode(source: Any, index: Any, field: str, fps: float | None, max_frames: int | None) -> np.ndarray:
    """Decode a file or file-like object's first video stream and keep the sampled frames as RGB arrays."""
    import av

    try:
        with av.open(source) as container:
            if not container.streams.video:
                raise SampleError(index, field, "the file has no video stream.")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            frames = list(container.decode(stream))  # decoded (YUV) frames; only the kept ones become RGB arrays
            kept = _select(frames, float(rate) if rate else None, index, field, fps, max_frames)
            return np.stack([frame.to_ndarray(format="rgb24") for frame in kept])
    except (av.FFmpegError, OSError) as err:
        raise SampleError(index, field, f"corrupt or undecodable video ({err}).") from err
