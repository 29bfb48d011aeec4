"""What encoded samples were encoded with: a fingerprint of the processor and the collator's settings.

Encoded samples (token ids with modality spans expanded, labels, processed pixels) are only valid for the processor
that made them. :func:`encoding_fingerprint` hashes, part by part, everything that decides them: the tokenizer
(vocabulary, merges, special tokens, chat template), each modality's processor settings, placeholder and feature
count, and the collator's fields, sampling rate and processor arguments. :func:`check_fingerprint` compares a stored
fingerprint with a run's and names the parts that differ.
"""

from __future__ import annotations

import hashlib
import json
import types
from collections.abc import Mapping
from typing import Any

from ..models.multimodal_language_model.import_paths import UNSERIALIZABLE, callback_spec, import_path


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=_plain)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _plain(value: Any) -> Any:
    """A JSON-able stand-in for the values of processor settings (arrays, enums, code)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, types.CodeType):
        return [value.co_code.hex(), value.co_names, value.co_varnames,
                [c if isinstance(c, (str, int, float, bool, type(None))) else _plain(c) for c in value.co_consts]]
    return repr(value) if not isinstance(value, (set, frozenset)) else sorted(map(repr, value))


def _tokenizer_state(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return {
        "class": type(tokenizer).__name__,
        "model": backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items()),
        "special": {name: str(getattr(tokenizer, f"{name}_token", None)) for name in ("bos", "eos", "pad", "unk")},
        "chat_template": getattr(tokenizer, "chat_template", None),
    }


def _counter_state(processor: Any, key: str) -> Any:
    """How a modality's features are counted: its saved spec (encoder config + callbacks) or count function."""
    spec = getattr(processor, "_counter_specs", {}).get(key)
    if spec is not None:
        return spec
    counter = processor.counters.get(key)
    if counter is None:
        return None
    named = callback_spec(counter)
    if named != UNSERIALIZABLE:
        return named
    code = getattr(counter, "__code__", None)  # a lambda or closure: its code
    return _plain(code) if code is not None else import_path(type(counter))


def encoding_fingerprint(collator: Any) -> dict[str, str]:
    """Part → hash of what :meth:`~cornstarch.data.collator.MultimodalCollator.encode` depends on: ``tokenizer``,
    one entry per modality key (its processor's class and settings, placeholder token and feature count), and
    ``settings`` (fields, sampling rate, processor arguments).

    Args:
        collator: a :class:`~cornstarch.data.collator.MultimodalCollator`.

    Returns:
        A dict of short hex digests; equal dicts mean the same encoded samples.

    >>> from transformers import CLIPImageProcessor
    >>> from cornstarch.data.collator import MultimodalCollator
    >>> from cornstarch.demo import demo_tokenizer
    >>> from cornstarch.models.multimodal_language_model import MultimodalProcessor
    >>> def collator(size):
    ...     image = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    ...     return MultimodalCollator(MultimodalProcessor({"vision": image}, demo_tokenizer(),
    ...         num_feature_calculation_funcs={"vision": lambda inputs, outputs: [4] * len(outputs["pixel_values"])},
    ...         predefined_tokens={"vision": "<image>"}))
    >>> a, b = encoding_fingerprint(collator(8)), encoding_fingerprint(collator(16))
    >>> sorted(a), [part for part in a if a[part] != b[part]]
    (['settings', 'tokenizer', 'vision'], ['vision'])
    """
    processor = collator.processor
    parts = {"tokenizer": _digest(_tokenizer_state(processor.tokenizer))}
    for key, modality in processor.encoder_processors.items():
        settings = modality.to_dict() if hasattr(modality, "to_dict") else vars(modality)
        parts[key] = _digest({"class": type(modality).__name__, "settings": settings,
                              "token": processor.tokens[key], "count": _counter_state(processor, key)})
    parts["settings"] = _digest({"fields": collator.fields, "sampling_rate": collator.sampling_rate,
                                 "processor_kwargs": collator.processor_kwargs})
    return parts


def check_fingerprint(stored: Mapping[str, str], current: Mapping[str, str], where: str) -> None:
    """Refuse encoded samples made with another processor.

    Raises:
        ValueError: naming the parts (tokenizer, a modality's processor, the collator settings) that differ.

    >>> check_fingerprint({"tokenizer": "a", "vision": "b"}, {"tokenizer": "a", "vision": "c"}, "data/shards")
    Traceback (most recent call last):
    ...
    ValueError: data/shards holds samples encoded with another processor than this run's (differs: vision processor); encoded samples are only valid for the processor that made them: encode them again with this run's config (`cornstarch prepare --config ...`), or write raw shards (`--encode false`) to process them while training.
    """
    differ = sorted(set(stored) | set(current), key=lambda part: (part != "tokenizer", part))
    differ = [part for part in differ if stored.get(part) != current.get(part)]
    if differ:
        names = ", ".join(part if part in ("tokenizer", "settings") else f"{part} processor" for part in differ)
        names = names.replace("settings", "collator settings (fields, sampling rate, processor arguments)")
        raise ValueError(f"{where} holds samples encoded with another processor than this run's (differs: {names}); "
                         f"encoded samples are only valid for the processor that made them: encode them again with "
                         f"this run's config (`cornstarch prepare --config ...`), or write raw shards "
                         f"(`--encode false`) to process them while training.")
