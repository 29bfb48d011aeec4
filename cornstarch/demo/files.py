"""The demo tasks written as files (PNG images, WAV tones, JSON Lines and an ``imagefolder`` layout), for
file-based loading."""

from __future__ import annotations

import json
import os
from pathlib import Path

import soundfile

from .splits import _canonical_split
from .tasks import _items, _valm_row, _vlm_row

__all__ = ["write_demo_files"]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def write_demo_files(
    out_dir: str | os.PathLike,
    split: str = "train",
    n: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    image_size: int = 32,
    sampling_rate: int = 16000,
    duration: float = 0.25,
) -> Path:
    """Write one split of the demo tasks as files, for file-based loading. Layout of ``out_dir/<split>/``::

        images/00000.png …       digit images (PNG, RGB)
        images/metadata.jsonl    imagefolder metadata of the vision task: file_name, messages, label
        audios/00000.wav …       DTMF tones (WAV, 32-bit float, so the samples round-trip exactly)
        vision.jsonl             vision task: messages, images (paths), label
        data.jsonl               vision + audio task: messages, images, audios (paths), sampling_rate,
                                 image_label, audio_label

    Paths inside the ``.jsonl`` files are relative to the split directory. The rows equal those of
    :func:`digits_vlm_dataset` and :func:`digits_valm_dataset` with the same arguments. Read back with
    ``load_dataset("json", data_files=str(d / "data.jsonl"))`` or ``load_dataset("imagefolder",
    data_dir=str(d / "images"))`` (whose image column is ``image``), offline.

    Args:
        out_dir: Root directory; created if missing.
        split: ``"train"`` or ``"validation"`` (alias ``"val"``).
        n: Write only the first ``n`` rows (all with ``None``).
        val_fraction, seed, image_size: As in :func:`digits_vlm_dataset`.
        sampling_rate, duration: As in :func:`digits_valm_dataset`.

    Returns:
        The split directory ``out_dir/<split>``.

    Raises:
        ValueError: unknown split, ``val_fraction`` outside (0, 1), negative ``n`` or too low a sampling rate.

    >>> import tempfile; split_dir = write_demo_files(tempfile.mkdtemp(), split="val", n=2)
    >>> split_dir.name, sorted(p.name for p in split_dir.iterdir()), len(list((split_dir / "audios").iterdir()))
    ('validation', ['audios', 'data.jsonl', 'images', 'vision.jsonl'], 2)
    """
    split_dir = Path(out_dir) / _canonical_split(split, val_fraction)
    items = _items(split, val_fraction, seed, image_size, n)
    (split_dir / "images").mkdir(parents=True, exist_ok=True)
    (split_dir / "audios").mkdir(parents=True, exist_ok=True)
    metadata, vision, data = [], [], []
    for k, item in enumerate(items):
        image_path, audio_path = f"images/{k:05d}.png", f"audios/{k:05d}.wav"
        vlm, valm = _vlm_row(item), _valm_row(item, sampling_rate, duration)
        item.image.save(split_dir / image_path)
        soundfile.write(split_dir / audio_path, valm["audios"][0], sampling_rate, subtype="FLOAT")
        metadata.append({"file_name": Path(image_path).name, "messages": vlm["messages"], "label": vlm["label"]})
        vision.append({**vlm, "images": [image_path]})
        data.append({**valm, "images": [image_path], "audios": [audio_path]})
    _write_jsonl(split_dir / "images" / "metadata.jsonl", metadata)
    _write_jsonl(split_dir / "vision.jsonl", vision)
    _write_jsonl(split_dir / "data.jsonl", data)
    return split_dir
