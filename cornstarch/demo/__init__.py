"""Offline demo data: digit images, DTMF tones of digits and a tiny tokenizer, all built locally.

Nothing here downloads anything. The images are scikit-learn's bundled 8×8 handwritten digits (``load_digits``,
1797 images, pixel values 0..16), upscaled to RGB; the audio is synthesised as the two DTMF sine tones a phone
keypad plays for a digit; the tokenizer (:func:`demo_tokenizer`) is a small byte-level BPE trained locally on a
corpus that covers the demo prompts and answers.

Three tasks, each an in-memory :class:`datasets.Dataset` with a deterministic, disjoint train/validation split:

- vision (``digits_vlm_dataset``): ``"<image>\\nWhich digit is this?"`` → ``"seven"``;
- vision + audio (``digits_valm_dataset``): the image of digit *a* and the tone of an independently drawn digit
  *b*, ``"<image>\\n<audio>\\nWhich digits are shown and played?"`` → ``"seven three"``;
- video (``digits_video_dataset``, :mod:`~cornstarch.demo.clips`): an MP4 clip of 2–4 digits shown one after
  another, frames of a different size per clip, ``"<video>\\nWhich digits are shown, in order?"`` →
  ``"three one four"``.

Rows follow the sample layout of the data layer: ``{"messages": [...], "images": [...], "audios": [...]}`` plus
label columns. ``write_demo_files`` writes the same samples as PNG/WAV files with ``data.jsonl``,
``vision.jsonl`` and an ``imagefolder`` layout, for file-based loading. Built artefacts (the tokenizer) are cached
under :func:`demo_root` and built on first use.

Configs name these functions as ``"cornstarch.demo:demo_tokenizer"`` and ``"cornstarch.demo:digits_vlm_dataset"``.

Modules: :mod:`~cornstarch.demo.prompts` (placeholders, digit names, questions), :mod:`~cornstarch.demo.digits`
(the digit images), :mod:`~cornstarch.demo.tones` (DTMF tones), :mod:`~cornstarch.demo.splits` (train/validation),
:mod:`~cornstarch.demo.tasks` (the two datasets), :mod:`~cornstarch.demo.files` (the same as files),
:mod:`~cornstarch.demo.tokenizer` (the BPE tokenizer and its chat template), :mod:`~cornstarch.demo.cache` (where
it is cached).

>>> from cornstarch.demo import digits_vlm_dataset
>>> digits_vlm_dataset("validation", n=1)[0]["messages"][0]["content"]
'<image>\\nWhich digit is this?'
"""

from .cache import demo_root
from .clips import VIDEO_PLACEHOLDER, VIDEO_QUESTION, digits_video_dataset, write_digit_clips
from .digits import digits_images
from .files import write_demo_files
from .prompts import AUDIO_PLACEHOLDER, DIGIT_NAMES, IMAGE_PLACEHOLDER, VALM_QUESTION, VLM_QUESTION
from .splits import SPLITS, digits_split
from .tasks import VALM_FEATURES, VLM_FEATURES, digits_valm_dataset, digits_vlm_dataset
from .tokenizer import CHAT_TEMPLATE, demo_tokenizer, tokenizer_corpus
from .tones import DTMF_FREQUENCIES, dtmf_tone

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
    "VIDEO_PLACEHOLDER",
    "VIDEO_QUESTION",
    "VLM_QUESTION",
    "demo_root",
    "demo_tokenizer",
    "digits_images",
    "digits_split",
    "digits_valm_dataset",
    "digits_video_dataset",
    "digits_vlm_dataset",
    "dtmf_tone",
    "tokenizer_corpus",
    "write_demo_files",
    "write_digit_clips",
]
