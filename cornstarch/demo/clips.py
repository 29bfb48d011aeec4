"""The video demo task: a short clip of 2–4 digits shown one after another → their names in order.

Each clip is a real video file (H.264 in MP4, written with PyAV) of scikit-learn's 8×8 digits, each upscaled and
centred in a frame whose size varies from clip to clip (so clips yield different token counts on a
dynamic-resolution tower), each digit held for ``frames_per_digit`` frames. Training clips draw their digits from
the training images (each shifted by up to a pixel), validation clips from the held-out images, so validation clips
are unseen. The files are written once under :func:`~cornstarch.demo.cache.demo_root` and reused.

>>> row = digits_video_dataset("validation", n=1)[0]
>>> row["messages"][0]["content"]
'<video>\\nWhich digits are shown, in order?'
>>> row["videos"][0].endswith(".mp4"), len(row["messages"][1]["content"].split()) == len(row["digits"])
(True, True)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import datasets
import numpy as np

from .cache import demo_root
from .digits import NUDGES, _digits, _shift
from .prompts import DIGIT_NAMES, _conversation
from .splits import SPLITS, _canonical_split, digits_split

__all__ = ["FRAME_SIZES", "VIDEO_PLACEHOLDER", "VIDEO_QUESTION", "digits_video_dataset", "write_digit_clips",
           "write_video"]

VIDEO_PLACEHOLDER = "<video>"
VIDEO_QUESTION = f"{VIDEO_PLACEHOLDER}\nWhich digits are shown, in order?"
# (height, width) of the frames, one per clip: multiples of 8 (a 4-pixel patch merged 2×2), the digit scaled to
# the short side and centred.
FRAME_SIZES = ((16, 16), (16, 24), (24, 16), (24, 24))
_FORMAT = 1  # bump when the files' content changes


def _frame(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """An 8×8 digit (0..16) scaled by nearest neighbour to the short side and centred: ``[height, width, 3]`` uint8."""
    scale = min(height, width) // 8
    digit = np.kron(np.rint(pixels * (255 / 16)).astype(np.uint8), np.ones((scale, scale), np.uint8))
    frame = np.zeros((height, width), np.uint8)
    top, left = (height - digit.shape[0]) // 2, (width - digit.shape[1]) // 2
    frame[top:top + digit.shape[0], left:left + digit.shape[1]] = digit
    return np.repeat(frame[:, :, None], 3, axis=2)


def _clips(split: str, n: int, val_fraction: float, seed: int, min_digits: int, max_digits: int) -> list[dict]:
    """The first ``n`` clips of a split: digit indices, shifts and frame size of each (deterministic)."""
    indices = digits_split(split, val_fraction, seed)
    rng = np.random.default_rng([seed, SPLITS.index(split), 1])
    clips = []
    for _ in range(n):
        count = int(rng.integers(min_digits, max_digits + 1))
        shifts = rng.integers(0, len(NUDGES), count) if split == "train" else np.zeros(count, np.int64)
        clips.append({"images": rng.choice(indices, count).tolist(), "shifts": shifts.tolist(),
                      "size": FRAME_SIZES[int(rng.integers(len(FRAME_SIZES)))]})
    return clips


def write_digit_clips(out_dir: str | os.PathLike, split: str = "train", n: int = 8, val_fraction: float = 0.2,
                      seed: int = 0, min_digits: int = 2, max_digits: int = 4, frames_per_digit: int = 2,
                      fps: float = 4.0) -> list[dict]:
    """Write ``n`` clips of a split as MP4 files into ``out_dir`` and return their rows.

    Args:
        out_dir: directory for ``00000.mp4``…; created if missing.
        split, val_fraction, seed: the digits' split (:func:`~cornstarch.demo.splits.digits_split`).
        n: number of clips.
        min_digits, max_digits: digits per clip, drawn uniformly.
        frames_per_digit: frames each digit stays on screen.
        fps: the files' frame rate.

    Returns:
        Rows ``{"messages", "videos": [path], "digits": [...]}``, paths absolute.

    Raises:
        ValueError: unknown split, ``val_fraction`` outside (0, 1), or a digit count outside 1..10.

    >>> rows = write_digit_clips(tempfile.mkdtemp(), "validation", n=2)
    >>> from cornstarch.data.video import load_video
    >>> [load_video(r["videos"][0], index=0).shape[0] == 2 * len(r["digits"]) for r in rows]
    [True, True]
    """
    split = _canonical_split(split, val_fraction)
    if not 1 <= min_digits <= max_digits <= 10:
        raise ValueError(f"need 1 <= min_digits <= max_digits <= 10, got {min_digits} and {max_digits}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pixels, labels = _digits()
    rows = []
    for k, clip in enumerate(_clips(split, n, val_fraction, seed, min_digits, max_digits)):
        height, width = clip["size"]
        frames = [_frame(_shift(pixels[i], *NUDGES[s]), height, width)
                  for i, s in zip(clip["images"], clip["shifts"]) for _ in range(frames_per_digit)]
        path = out_dir / f"{k:05d}.mp4"
        write_video(path, np.stack(frames), fps=fps)
        digits = [int(labels[i]) for i in clip["images"]]
        answer = " ".join(DIGIT_NAMES[d] for d in digits)
        rows.append({"messages": _conversation(VIDEO_QUESTION, answer), "videos": [str(path.resolve())],
                     "digits": digits})
    return rows


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = 10.0, codec: str = "libx264",
                options: dict[str, str] | None = None, pix_fmt: str = "yuv444p") -> None:
    """Write ``[frames, height, width, 3]`` ``uint8`` frames as a video file with PyAV (H.264 by default).

    The defaults (``yuv444p``, no chroma subsampling; H.264 at ``crf`` 0) keep the frames close to lossless, so small
    synthetic clips read back as they were written, within colour-conversion rounding.

    Args:
        path: the file (its extension picks the container: ``.mp4``, ``.mkv``…).
        frames: the frames.
        fps: frame rate (an integer or a fraction-like float).
        codec: FFmpeg encoder name (``libx264``, ``ffv1``, ``libvpx-vp9``…).
        options: encoder options (default ``{"crf": "0"}`` for H.264, none otherwise).
        pix_fmt: the encoder's pixel format.

    >>> import av
    >>> path = os.path.join(tempfile.mkdtemp(), "clip.mp4")
    >>> write_video(path, np.full((3, 8, 8, 3), 200, dtype=np.uint8), fps=5)
    >>> with av.open(path) as container:
    ...     [frame.to_ndarray(format="rgb24").shape for frame in container.decode(video=0)]
    [(8, 8, 3), (8, 8, 3), (8, 8, 3)]
    """
    import av
    from fractions import Fraction

    frames = np.asarray(frames, dtype=np.uint8)
    with av.open(os.fspath(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        stream.options = options if options is not None else ({"crf": "0"} if codec in ("libx264", "h264") else {})
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


_FEATURES = datasets.Features({
    "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
    "videos": datasets.List(datasets.Value("string")),
    "digits": datasets.List(datasets.ClassLabel(names=list(DIGIT_NAMES))),
})


def digits_video_dataset(split: str = "train", n: int | None = None, val_fraction: float = 0.2, seed: int = 0,
                         min_digits: int = 2, max_digits: int = 4, frames_per_digit: int = 2,
                         fps: float = 4.0) -> datasets.Dataset:
    """The video demo task: ``"<video>\\nWhich digits are shown, in order?"`` → ``"three one four"``.

    The clips are written once (:func:`write_digit_clips`) under ``demo_root()/digits_video/``, in a directory named
    by the arguments, and reused; a smaller ``n`` gives a prefix of the same clips.

    Args:
        split: ``"train"`` or ``"validation"`` (``"val"``); validation clips show held-out digit images.
        n: number of clips (default: 4000 for train, 400 for validation).
        val_fraction, seed, min_digits, max_digits, frames_per_digit, fps: as in :func:`write_digit_clips`.

    Returns:
        In-memory ``datasets.Dataset`` with ``messages``, ``videos`` (one MP4 path) and ``digits`` (the digits
        shown, in order).

    Raises:
        ValueError: as :func:`write_digit_clips`.
    """
    split = _canonical_split(split, val_fraction)
    n = (4000 if split == "train" else 400) if n is None else n
    if n < 0:
        raise ValueError(f"n must be None or >= 0, got {n}")
    settings = [_FORMAT, split, val_fraction, seed, min_digits, max_digits, frames_per_digit, fps]
    name = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:12]
    root = demo_root() / "digits_video" / f"{split}-{name}"
    rows_file = root / "rows.jsonl"
    have = rows_file.read_text().splitlines() if rows_file.exists() else []
    if len(have) < n:  # write all n clips in a fresh directory, then swap it in (concurrent readers see whole files)
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}-"))
        rows = write_digit_clips(staging, split, n, val_fraction, seed, min_digits, max_digits, frames_per_digit,
                                 fps)
        for row in rows:
            row["videos"] = [str(root / Path(p).name) for p in row["videos"]]
        (staging / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        old = root.with_name(f".{root.name}-old-{os.getpid()}")
        if root.exists():
            root.rename(old)
        staging.rename(root)
        shutil.rmtree(old, ignore_errors=True)
        have = rows_file.read_text().splitlines()
    return datasets.Dataset.from_list([json.loads(line) for line in have[:n]], features=_FEATURES)
