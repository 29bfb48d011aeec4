"""Deprecated alias of :mod:`cornstarch.demo`, the offline demo data; import from there instead.

Kept so that configs naming ``cornstarch.data.demo:build_tokenizer`` or ``cornstarch.data.demo:digits_vlm_dataset``
keep working. ``build_tokenizer`` here is :func:`cornstarch.demo.demo_tokenizer` (it trains the demo BPE; not to be
confused with :func:`cornstarch.models.builder.build_tokenizer`, which loads a tokenizer). Every other name is the
object of the same name in :mod:`cornstarch.demo`. Importing this module emits a ``DeprecationWarning``.
"""

import warnings

from ..demo import (
    AUDIO_PLACEHOLDER,
    CHAT_TEMPLATE,
    DIGIT_NAMES,
    DTMF_FREQUENCIES,
    IMAGE_PLACEHOLDER,
    SPLITS,
    VALM_FEATURES,
    VALM_QUESTION,
    VLM_FEATURES,
    VLM_QUESTION,
    demo_root,
    digits_images,
    digits_split,
    digits_valm_dataset,
    digits_vlm_dataset,
    dtmf_tone,
    tokenizer_corpus,
    write_demo_files,
)
from ..demo import demo_tokenizer as build_tokenizer

warnings.warn("cornstarch.data.demo is deprecated: use cornstarch.demo (build_tokenizer is now demo_tokenizer)",
              DeprecationWarning, stacklevel=2)

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
