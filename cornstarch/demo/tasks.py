"""The two demo tasks as in-memory :class:`datasets.Dataset` s: digit image → its name (``digits_vlm_dataset``), and
digit image + DTMF tone of another digit → both names (``digits_valm_dataset``)."""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import numpy as np
import PIL.Image

from .digits import NUDGES, _digits, _shift, _to_image
from .prompts import DIGIT_NAMES, VALM_QUESTION, VLM_QUESTION, _conversation
from .splits import SPLITS, _canonical_split, digits_split
from .tones import dtmf_tone

__all__ = ["VALM_FEATURES", "VLM_FEATURES", "digits_valm_dataset", "digits_vlm_dataset"]


@dataclass(frozen=True)
class _Item:
    """One demo row before formatting: a digit image, and the digit (and jitter seed) of its paired tone."""

    image: PIL.Image.Image
    image_label: int
    audio_label: int
    tone_seed: int


def _items(split: str, val_fraction: float, seed: int, image_size: int, n: int | None,
           nudge: bool = False) -> list[_Item]:
    """The first ``n`` rows of a split (all with ``n=None``). Tone digits are drawn independently of the image's
    digit, from a generator seeded by ``(seed, split)``, so a smaller ``n`` gives a prefix of the same rows. With
    ``nudge``, each digit also appears shifted by one pixel in each of 4 directions (5 rows per digit)."""
    split = _canonical_split(split, val_fraction)
    if n is not None and n < 0:
        raise ValueError(f"n must be None or >= 0, got {n}")
    indices = digits_split(split, val_fraction, seed)
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    audio_labels = rng.integers(0, 10, size=len(indices))
    tone_seeds = rng.integers(0, 2**31, size=len(indices))
    pixels, labels = _digits()
    shifts = NUDGES if nudge else NUDGES[:1]
    return [
        _Item(_to_image(_shift(pixels[i], dy, dx), image_size, "nearest"), int(labels[i]), int(a), int(s))
        for i, a, s in list(zip(indices, audio_labels, tone_seeds))[:n]
        for dy, dx in shifts
    ]


def _vlm_row(item: _Item) -> dict:
    return {
        "messages": _conversation(VLM_QUESTION, DIGIT_NAMES[item.image_label]),
        "images": [item.image],
        "label": item.image_label,
    }


def _valm_row(item: _Item, sampling_rate: int, duration: float) -> dict:
    answer = f"{DIGIT_NAMES[item.image_label]} {DIGIT_NAMES[item.audio_label]}"
    return {
        "messages": _conversation(VALM_QUESTION, answer),
        "images": [item.image],
        "audios": [dtmf_tone(item.audio_label, sampling_rate, duration, seed=item.tone_seed)],
        "sampling_rate": sampling_rate,
        "image_label": item.image_label,
        "audio_label": item.audio_label,
    }


def _audios_as_arrays(batch: dict[str, list]) -> dict[str, list]:
    """Dataset transform: each row's ``audios`` as a list of 1-D float32 arrays."""
    if "audios" in batch:  # absent when the columns were narrowed
        batch["audios"] = [[np.asarray(a, dtype=np.float32) for a in audios] for audios in batch["audios"]]
    return batch


_MESSAGES = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
_DIGIT = datasets.ClassLabel(names=list(DIGIT_NAMES))
VLM_FEATURES = datasets.Features(
    {"messages": _MESSAGES, "images": datasets.List(datasets.Image()), "label": _DIGIT}
)
VALM_FEATURES = datasets.Features(
    {
        "messages": _MESSAGES,
        "images": datasets.List(datasets.Image()),
        "audios": datasets.List(datasets.List(datasets.Value("float32"))),
        "sampling_rate": datasets.Value("int32"),
        "image_label": _DIGIT,
        "audio_label": _DIGIT,
    }
)


def digits_vlm_dataset(
    split: str = "train", val_fraction: float = 0.2, seed: int = 0, image_size: int = 32, n: int | None = None,
    nudge: bool = False,
) -> datasets.Dataset:
    """The vision demo task: one digit image, ``"<image>\\nWhich digit is this?"`` → its name (``"seven"``).

    Args:
        split: ``"train"`` or ``"validation"`` (alias ``"val"``; see :func:`digits_split`; disjoint images).
        val_fraction: Share of the images held out for validation.
        seed: Seed of the split.
        image_size: Side of the RGB images (nearest-neighbour upscaling of the 8×8 source).
        n: Keep only the first ``n`` rows (the same rows as in the full split).
        nudge: Also include each digit shifted by one pixel up, down, left and right (5× the rows): an
            augmentation for training splits.

    Returns:
        In-memory ``datasets.Dataset`` with columns ``messages`` (user, assistant), ``images`` (list of one PIL
        image) and ``label`` (``ClassLabel`` 0..9, whose name is the answer).

    Raises:
        ValueError: unknown split, ``val_fraction`` outside (0, 1) or negative ``n``.

    >>> row = digits_vlm_dataset("validation", n=2)[0]
    >>> row["messages"][1]["content"] == DIGIT_NAMES[row["label"]], row["images"][0].size
    (True, (32, 32))
    """
    items = _items(split, val_fraction, seed, image_size, n, nudge)
    return datasets.Dataset.from_list([_vlm_row(item) for item in items], features=VLM_FEATURES)


def digits_valm_dataset(
    split: str = "train",
    val_fraction: float = 0.2,
    seed: int = 0,
    image_size: int = 32,
    n: int | None = None,
    sampling_rate: int = 16000,
    duration: float = 0.25,
    nudge: bool = False,
) -> datasets.Dataset:
    """The vision + audio demo task: the image of digit *a* and the DTMF tone of digit *b*, asked
    ``"<image>\\n<audio>\\nWhich digits are shown and played?"``, answered ``"<name of a> <name of b>"``.

    *b* is drawn independently of *a*, so neither modality predicts the other and both are needed; yet each answer
    word depends on one modality only (a lookup, no arithmetic), which a tiny model learns quickly. The images and
    split are those of :func:`digits_vlm_dataset` with the same arguments, row for row.

    Args:
        split, val_fraction, seed, image_size, n: As in :func:`digits_vlm_dataset`.
        sampling_rate: Sampling rate of the tones (also stored per row).
        duration: Tone length in seconds.
        nudge: Also include each digit shifted by one pixel in 4 directions (5× the rows; training augmentation).

    Returns:
        In-memory ``datasets.Dataset`` with columns ``messages``, ``images`` (one PIL image), ``audios`` (one tone),
        ``sampling_rate``, ``image_label`` and ``audio_label`` (``ClassLabel`` 0..9). Arrow stores the tones as float
        lists; a transform (``with_transform``, kept by ``select``/``shuffle``) gives each row's ``audios`` back as
        a list of 1-D ``float32`` arrays.

    Raises:
        ValueError: unknown split, ``val_fraction`` outside (0, 1), negative ``n`` or too low a sampling rate.

    >>> row = digits_valm_dataset(n=1, sampling_rate=8000)[0]
    >>> type(row["audios"]).__name__, row["audios"][0].dtype, row["audios"][0].shape, row["sampling_rate"]
    ('list', dtype('float32'), (2000,), 8000)
    """
    items = _items(split, val_fraction, seed, image_size, n, nudge)
    rows = [_valm_row(item, sampling_rate, duration) for item in items]
    return datasets.Dataset.from_list(rows, features=VALM_FEATURES).with_transform(_audios_as_arrays)
