"""Offline demo data: digit images, DTMF tones of digits and a tiny tokenizer, all built locally.

Nothing here downloads anything. The images are scikit-learn's bundled 8×8 handwritten digits (``load_digits``,
1797 images, pixel values 0..16), upscaled to RGB; the audio is synthesised as the two DTMF sine tones a phone
keypad plays for a digit; the tokenizer is a small byte-level BPE trained in well under a second on a corpus that
covers the demo prompts and answers.

Two tasks, each an in-memory :class:`datasets.Dataset` with a deterministic, disjoint train/validation split:

- vision (``digits_vlm_dataset``): ``"<image>\\nWhich digit is this?"`` → ``"seven"``;
- vision + audio (``digits_valm_dataset``): the image of digit *a* and the tone of an independently drawn digit
  *b*, ``"<image>\\n<audio>\\nWhich digits are shown and played?"`` → ``"seven three"``.

Rows follow the sample layout of the data layer: ``{"messages": [...], "images": [...], "audios": [...]}`` plus
label columns. ``write_demo_files`` writes the same samples as PNG/WAV files with ``data.jsonl``,
``vision.jsonl`` and an ``imagefolder`` layout, for file-based loading. Built artefacts (the tokenizer) are cached
under :func:`demo_root` and built on first use.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import soundfile
import tokenizers
from sklearn.datasets import load_digits
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.utils.chat_template_utils import render_jinja_template

__all__ = [
    "AUDIO_PLACEHOLDER",
    "CHAT_TEMPLATE",
    "DIGIT_NAMES",
    "DTMF_FREQUENCIES",
    "IMAGE_PLACEHOLDER",
    "SPLITS",
    "VALM_FEATURES",
    "VALM_QUESTION",
    "VLM_FEATURES",
    "VLM_QUESTION",
    "build_tokenizer",
    "demo_root",
    "digits_images",
    "digits_split",
    "digits_valm_dataset",
    "digits_vlm_dataset",
    "dtmf_tone",
    "tokenizer_corpus",
    "write_demo_files",
]

IMAGE_PLACEHOLDER = "<image>"
AUDIO_PLACEHOLDER = "<audio>"
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VLM_QUESTION = f"{IMAGE_PLACEHOLDER}\nWhich digit is this?"
VALM_QUESTION = f"{IMAGE_PLACEHOLDER}\n{AUDIO_PLACEHOLDER}\nWhich digits are shown and played?"
SPLITS = ("train", "validation")
_SPLIT_ALIASES = {"val": "validation"}

# (row, column) frequencies in Hz of the phone keypad: 1 2 3 / 4 5 6 / 7 8 9 / * 0 #.
DTMF_FREQUENCIES = {
    1: (697, 1209), 2: (697, 1336), 3: (697, 1477),
    4: (770, 1209), 5: (770, 1336), 6: (770, 1477),
    7: (852, 1209), 8: (852, 1336), 9: (852, 1477),
    0: (941, 1336),
}

# The assistant turn is wrapped in {% generation %} so that `apply_chat_template(..., return_dict=True,
# return_assistant_tokens_mask=True)` marks exactly the answer (and its </s>) as supervised. The generation prompt
# is "ASSISTANT:" without the space: the space starts the answer token (" seven"), so a prompt's ids are a prefix of
# the full conversation's ids. Transformers renders with trim_blocks, which would eat a newline written right after
# a block tag, hence the {{ '\\n' }}.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}USER: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}ASSISTANT:{% generation %} {{ message['content'] }}{{ eos_token }}"
    "{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}

# Generic English, so that the tokenizer handles more than the demo prompts with reasonable pieces.
_GENERIC_TEXT = """\
The quick brown fox jumps over the lazy dog. A picture shows a small number written by hand.
Please describe the image and the sound in a few words. What is in this picture? What do you hear?
The answer is a single word. Count the objects and say how many there are. Is it a cat or a dog?
This model reads images, listens to audio and writes text. Each sample has a question and an answer.
Yes, no, maybe. Hello, how are you today? I am fine, thank you. Good morning and good night.
The phone plays two tones for every key that you press on the keypad. Listen to the tone again.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000. First, second, third, last. Left, right, up, down.
Colors: red, green, blue, black, white, gray, yellow. Shapes: a circle, a square, a line, a dot.
Training a language model takes data, time and patience; validation tells us when to stop.
"""


# ----------------------------------------------------------------------------------------------------------------
# Cache and tokenizer


def demo_root() -> Path:
    """Directory where demo artefacts are cached (built on first use, not created here).

    Returns:
        ``$CORNSTARCH_CACHE`` if set, else ``~/.cache/cornstarch``.

    >>> demo_root().is_absolute()
    True
    """
    return Path(os.environ.get("CORNSTARCH_CACHE") or "~/.cache/cornstarch").expanduser()


def _conversation(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def tokenizer_corpus() -> list[str]:
    """Texts the demo tokenizer is trained on: every demo conversation, rendered with :data:`CHAT_TEMPLATE` (special
    tokens left out), plus generic English.

    >>> any("ASSISTANT: seven three" in text for text in tokenizer_corpus())
    True
    """
    conversations = [_conversation(VLM_QUESTION, name) for name in DIGIT_NAMES]
    conversations += [_conversation(VALM_QUESTION, f"{a} {b}") for a in DIGIT_NAMES for b in DIGIT_NAMES]
    rendered, _ = render_jinja_template(conversations, chat_template=CHAT_TEMPLATE, bos_token="", eos_token="")
    return rendered + _GENERIC_TEXT.splitlines()


def _train_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, chat_template=CHAT_TEMPLATE, **SPECIAL_TOKENS)


def _fingerprint(vocab_size: int) -> str:
    """Hash of everything the trained tokenizer depends on, to tell a stale cache from a current one."""
    recipe = [tokenizer_corpus(), vocab_size, CHAT_TEMPLATE, SPECIAL_TOKENS, tokenizers.__version__]
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


_STAMP = "cornstarch_demo_tokenizer.json"


def _is_current(save_dir: Path, fingerprint: str) -> bool:
    try:
        return json.loads((save_dir / _STAMP).read_text())["fingerprint"] == fingerprint
    except (OSError, ValueError, KeyError):
        return False


def _save(tokenizer: PreTrainedTokenizerFast, save_dir: Path, fingerprint: str) -> None:
    """Save with its stamp. A new directory is filled under a temporary name and renamed into place, so concurrent
    builders (e.g. DDP ranks) never see half a tokenizer; the loser of a race drops its copy."""
    def fill(directory: Path) -> None:
        tokenizer.save_pretrained(directory)
        (directory / _STAMP).write_text(json.dumps({"fingerprint": fingerprint}))

    if save_dir.exists():
        fill(save_dir)
        return
    save_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{save_dir.name}-", dir=save_dir.parent))
    fill(tmp)
    try:
        os.replace(tmp, save_dir)
    except OSError:  # another process created save_dir meanwhile
        for path in tmp.iterdir():
            path.unlink()
        tmp.rmdir()


def build_tokenizer(
    save_dir: str | os.PathLike | None = None, vocab_size: int = 600, overwrite: bool = False
) -> PreTrainedTokenizerFast:
    """Train (or reuse) the demo byte-level BPE tokenizer and save it where ``AutoTokenizer`` can load it.

    The tokenizer has ``<pad>``/``<s>``/``</s>``/``<unk>`` as pad/bos/eos/unk tokens (ids 0..3), adds no special
    tokens on plain encoding (the chat template writes ``<s>`` and ``</s>``), decodes any text back exactly (byte
    level: nothing is ever unknown), and encodes each digit name after a space as a single token. Training is
    deterministic; a directory already holding the tokenizer of the same recipe is reused as is.

    Args:
        save_dir: Where to save; default ``demo_root() / "tokenizer"``. Created if missing; an existing directory
            keeps its other files.
        vocab_size: Target vocabulary size, special tokens included.
        overwrite: Retrain even if ``save_dir`` already holds a current tokenizer.

    Returns:
        The tokenizer as loaded back from ``save_dir`` (the same object ``AutoTokenizer.from_pretrained(save_dir)``
        gives), with :data:`CHAT_TEMPLATE` as its chat template.

    >>> import tempfile; tok = build_tokenizer(tempfile.mkdtemp())
    >>> tok.decode(tok(" seven").input_ids), len(tok(" seven").input_ids), tok.pad_token_id
    (' seven', 1, 0)
    """
    save_dir = Path(save_dir) if save_dir is not None else demo_root() / "tokenizer"
    fingerprint = _fingerprint(vocab_size)
    if overwrite or not _is_current(save_dir, fingerprint):
        _save(_train_tokenizer(vocab_size), save_dir, fingerprint)
    return AutoTokenizer.from_pretrained(save_dir)


# ----------------------------------------------------------------------------------------------------------------
# Images and tones


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: pixels ``[1797, 8, 8]`` (0..16) and labels ``[1797]``, read-only."""
    bunch = load_digits()
    pixels, labels = bunch.images, bunch.target.astype(np.int64)
    pixels.setflags(write=False)
    labels.setflags(write=False)
    return pixels, labels


def _resampling(resample: str | int) -> int:
    if isinstance(resample, str):
        try:
            return PIL.Image.Resampling[resample.upper()]
        except KeyError:
            valid = [r.name.lower() for r in PIL.Image.Resampling]
            raise ValueError(f"unknown resample {resample!r}; valid: {valid}") from None
    return resample


def _to_image(pixels: np.ndarray, size: int, resample: str | int) -> PIL.Image.Image:
    gray = PIL.Image.fromarray(np.rint(pixels * (255 / 16)).astype(np.uint8))  # 2-D uint8: mode "L"
    return gray.resize((size, size), _resampling(resample)).convert("RGB")


def digits_images(size: int = 32, resample: str | int = "nearest") -> tuple[list[PIL.Image.Image], np.ndarray]:
    """All 1797 bundled scikit-learn digits as RGB images (white ink on black), with their labels.

    Args:
        size: Side of the square output images in pixels (the source is 8×8).
        resample: PIL resampling filter, by name (``"nearest"``, ``"bilinear"``, ``"bicubic"``, …) or value.

    Returns:
        ``(images, labels)``: a list of ``size``×``size`` RGB ``PIL.Image`` and an ``int64`` array of digits 0..9.

    Raises:
        ValueError: unknown ``resample`` name.

    >>> images, labels = digits_images(16)
    >>> len(images), images[0].size, images[0].mode, int(labels[0])
    (1797, (16, 16), 'RGB', 0)
    """
    pixels, labels = _digits()
    return [_to_image(p, size, resample) for p in pixels], labels.copy()


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


# ----------------------------------------------------------------------------------------------------------------
# Splits and samples


def _canonical_split(split: str, val_fraction: float) -> str:
    """The split's name in :data:`SPLITS` (``"val"`` is accepted for ``"validation"``), after checking both."""
    split = _SPLIT_ALIASES.get(split, split)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {list(SPLITS)} (or 'val')")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    return split


def digits_split(split: str = "train", val_fraction: float = 0.2, seed: int = 0) -> np.ndarray:
    """Indices (into the 1797 bundled digits) of one split: a seeded permutation cut into validation (the first
    ``round(1797 * val_fraction)``) and train (the rest), each returned sorted. The splits are disjoint and together
    cover every digit image.

    Args:
        split: ``"train"`` or ``"validation"`` (alias ``"val"``).
        val_fraction: Share of the images held out for validation, in (0, 1).
        seed: Seed of the permutation.

    Returns:
        Sorted ``int64`` index array.

    Raises:
        ValueError: unknown split or ``val_fraction`` outside (0, 1).

    >>> len(digits_split("train")), len(digits_split("validation"))
    (1438, 359)
    """
    split = _canonical_split(split, val_fraction)
    n = len(_digits()[1])
    order = np.random.default_rng(seed).permutation(n)
    n_val = round(n * val_fraction)
    return np.sort(order[:n_val] if split == "validation" else order[n_val:])


@dataclass(frozen=True)
class _Item:
    """One demo row before formatting: a digit image, and the digit (and jitter seed) of its paired tone."""

    image: PIL.Image.Image
    image_label: int
    audio_label: int
    tone_seed: int


# One-pixel shifts of the 8×8 digits (scikit-learn's "nudge" augmentation): the original first, then 4 shifts.
NUDGES = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1))


def _shift(pixels: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``pixels`` moved by ``(dy, dx)`` with zeros filled in (nothing wraps around)."""
    out = np.zeros_like(pixels)
    h, w = pixels.shape
    out[max(dy, 0): h + min(dy, 0), max(dx, 0): w + min(dx, 0)] = pixels[max(-dy, 0): h - max(dy, 0),
                                                                          max(-dx, 0): w - max(dx, 0)]
    return out


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


# ----------------------------------------------------------------------------------------------------------------
# Files


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
