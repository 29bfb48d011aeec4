"""MultimodalProcessor: each encoder's processor plus the LLM tokenizer, with placeholder expansion."""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np
from transformers import AutoTokenizer, BatchFeature

from ..feature_counts import FeatureCounter, flatten_counts
from .import_paths import UNSERIALIZABLE, import_path, resolve
from .placeholders import assign_items, count_placeholders, expand_placeholders

PROCESSOR_CONFIG = "cornstarch_processor.json"
TEXT_LAYOUT_KWARGS = ("padding", "truncation", "max_length", "pad_to_multiple_of", "padding_side", "return_tensors")


def accepted_kwargs(processor: Any) -> frozenset[str]:
    """Keyword names a processor's ``__call__`` accepts: its signature's, plus its ``valid_kwargs`` TypedDict's."""
    params = inspect.signature(processor.__call__).parameters.values()
    names = {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    valid = getattr(processor, "valid_kwargs", None)
    names |= set(getattr(valid, "__required_keys__", ())) | set(getattr(valid, "__optional_keys__", ()))
    return frozenset(names)


class MultimodalProcessor:
    """Turns raw modality items and text into model inputs for a :class:`MultimodalModel`.

    Registers one special token per modality (``<vision>``, ``<audio>``, … or ``predefined_tokens``) without
    dropping the tokenizer's existing special tokens, tells ``model`` their ids, and expands each placeholder into
    as many tokens as its item yields features.

    Args:
        encoder_processors: modality key → that encoder's processor (image processor, feature extractor, …).
        llm_tokenizer: the LM's tokenizer.
        model: the :class:`MultimodalModel`; gives the built-in feature counts (from each encoder's config and
            callbacks) and receives the token ids.
        num_feature_calculation_funcs: modality key → ``fn(inputs, outputs) -> list[int] | list[list[int]]``
            (features per item, flat or per sample), overriding the built-in count.
        predefined_tokens: modality key → placeholder text, e.g. ``{"vision": "<image>"}``.

    Raises:
        ValueError: if a key names no encoder of ``model``.

    >>> # processor = MultimodalProcessor({"vision": CLIPImageProcessor()}, tokenizer, model=mllm,
    >>> #                                 predefined_tokens={"vision": "<image>"})
    >>> # batch = processor({"vision": {"images": [img]}}, {"text": "<image> What is this?"})
    """

    def __init__(
        self,
        encoder_processors: Mapping[str, Any],
        llm_tokenizer: Any,
        model: Any = None,
        num_feature_calculation_funcs: Mapping[str, Callable] | None = None,
        predefined_tokens: Mapping[str, str] | None = None,
        _counter_specs: Mapping[str, dict] | None = None,
    ):
        self.encoder_processors = dict(encoder_processors)
        self.tokenizer = llm_tokenizer
        funcs = dict(num_feature_calculation_funcs or {})
        predefined = dict(predefined_tokens or {})
        keys = list(self.encoder_processors)
        if model is not None:
            unknown = set(keys) - set(model.encoders)
            if unknown:
                raise ValueError(f"Processors for {sorted(unknown)}, but the model's encoders are {list(model.encoders)}.")
        self.tokens = {key: predefined.get(key, f"<{key}>") for key in keys}
        new = [t for t in self.tokens.values() if t not in self.tokenizer.get_vocab()]
        if new:
            self.tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
        self.token_ids = {key: self.tokenizer.convert_tokens_to_ids(tok) for key, tok in self.tokens.items()}
        self._counter_specs = dict(_counter_specs or {})
        self.counters: dict[str, Callable] = {}
        for key in keys:
            if key in funcs:
                self.counters[key] = funcs[key]
            elif model is not None:
                encoder = model.encoders[key]
                callbacks = [encoder.postprocess_module_callback, encoder.postprocess_projector_callback]
                self._counter_specs[key] = {
                    "config_class": import_path(type(encoder.module.config)),
                    "config": encoder.module.config.to_dict(),
                    "callbacks": [import_path(cb) for cb in callbacks if cb is not None],
                }
                self.counters[key] = FeatureCounter(encoder.module.config, callbacks)
            elif key in self._counter_specs:
                self.counters[key] = _counter_from_spec(self._counter_specs[key])
        if model is not None:
            model.set_modality_token_ids(self.token_ids)

    # ----------------------------------------------------------------------------------------------- pieces
    def process_modality(self, key: str, inputs: Mapping[str, Any], **shared: Any) -> tuple[dict[str, Any], list[int]]:
        """Run one modality's processor on a batch of items; return its tensors and features per item.

        Raises:
            ValueError: for an unknown modality, or one with no way to count its features.
        """
        if key not in self.encoder_processors:
            raise ValueError(f"No processor for modality {key!r}; modalities: {list(self.encoder_processors)}.")
        if key not in self.counters:
            raise ValueError(
                f"Cannot count the {key} features: give the processor model=..., or "
                f"num_feature_calculation_funcs={{{key!r}: fn}}."
            )
        processor = self.encoder_processors[key]
        accepted = accepted_kwargs(processor)
        kwargs = {k: v for k, v in shared.items() if k in accepted}
        outputs = dict(processor(**inputs, **kwargs, return_tensors="pt"))
        return outputs, flatten_counts(self.counters[key](dict(inputs), outputs))

    def expand(self, ids: list[int], counts: Mapping[str, list[int]], labels: list[int] | None = None):
        """One sample's ids (one placeholder per item) → ids with placeholders expanded (see ``expand_placeholders``)."""
        return expand_placeholders(ids, self.token_ids, counts, labels)

    # ----------------------------------------------------------------------------------------------- call
    def __call__(
        self,
        encoder_inputs: Mapping[str, Mapping[str, Any]] | None = None,
        llm_inputs: Mapping[str, Any] | None = None,
        return_tensors: str = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        """Process a batch: items of each modality (in sample order) and the text with placeholders.

        Args:
            encoder_inputs: modality key → keyword arguments of its processor, e.g. ``{"vision": {"images": [...]}}``.
            llm_inputs: ``{"text": str | list[str], **tokenizer kwargs}`` (``padding``, ``max_length``,
                ``truncation``, ``padding_side``, ``add_special_tokens``…).
            return_tensors: ``"pt"``.
            **kwargs: shared keyword arguments, given to every processor (and the tokenizer) that accepts them.

        Returns:
            A ``BatchFeature`` with ``input_ids``, ``attention_mask`` and each processor's tensors.

        Raises:
            ValueError: naming the sample and modality when placeholders and items do not match, or when a
                sample is longer than ``max_length`` and truncation would cut a modality span.
        """
        llm_inputs = dict(llm_inputs or {})
        text = llm_inputs.pop("text")
        texts = [text] if isinstance(text, str) else list(text)
        features: dict[str, Any] = {}
        counts: dict[str, list[int]] = {}
        for key, inputs in (encoder_inputs or {}).items():
            outputs, counts[key] = self.process_modality(key, inputs, **kwargs)
            clash = set(outputs) & set(features)
            if clash:
                raise ValueError(f"Processors output the same names {sorted(clash)}; call them separately.")
            features.update(outputs)
        layout = {k: llm_inputs.pop(k) for k in TEXT_LAYOUT_KWARGS if k in llm_inputs}
        tok_kwargs = {k: v for k, v in kwargs.items() if k in accepted_kwargs(self.tokenizer) and k not in TEXT_LAYOUT_KWARGS}
        ids = self.tokenizer(texts, **{**tok_kwargs, **llm_inputs})["input_ids"]
        per_sample = {
            key: assign_items([count_placeholders(row, self.token_ids[key]) for row in ids], counts.get(key, []), key,
                              self.tokens[key])
            for key in self.tokens
        }
        expanded = []
        for i, row in enumerate(ids):
            row, _ = self.expand(row, {key: per_sample[key][i] for key in per_sample})
            expanded.append(self._fit(row, i, layout))
        padded = self.tokenizer.pad(
            {"input_ids": expanded}, padding=layout.get("padding", True),
            max_length=layout.get("max_length") if layout.get("padding") == "max_length" else None,
            pad_to_multiple_of=layout.get("pad_to_multiple_of"), padding_side=layout.get("padding_side"),
            return_tensors=return_tensors,
        )
        return BatchFeature({**padded, **features}, tensor_type=return_tensors)

    def _fit(self, row: list[int], sample: int, layout: Mapping[str, Any]) -> list[int]:
        """Apply ``max_length``: truncate only text after the last modality token, else raise."""
        max_length = layout.get("max_length")
        if max_length is None or len(row) <= max_length:
            return row
        modality = np.isin(np.asarray(row), list(self.token_ids.values()))
        cuts_span = bool(modality[max_length:].any())
        if not layout.get("truncation") or cuts_span:
            why = "truncation would cut a modality span" if cuts_span else "truncation is off"
            raise ValueError(f"Sample {sample} has {len(row)} tokens, more than max_length={max_length}, and {why}.")
        return row[:max_length]

    # ----------------------------------------------------------------------------------------------- save / load
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write the tokenizer, each encoder processor (in ``{key}/``) and ``cornstarch_processor.json``."""
        os.makedirs(save_directory, exist_ok=True)
        self.tokenizer.save_pretrained(save_directory)
        encoders = {}
        for key, processor in self.encoder_processors.items():
            processor.save_pretrained(os.path.join(save_directory, key))
            counter = self.counters.get(key)
            encoders[key] = {
                "processor_class": import_path(type(processor)),
                "token": self.tokens[key],
                "counter": self._counter_specs.get(key),
                "count_function": import_path(counter) if counter is not None and key not in self._counter_specs else None,
            }
        with open(os.path.join(save_directory, PROCESSOR_CONFIG), "w") as f:
            json.dump({"encoders": encoders}, f, indent=2)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        model: Any = None,
        num_feature_calculation_funcs: Mapping[str, Callable] | None = None,
    ) -> "MultimodalProcessor":
        """Load a processor written by :meth:`save_pretrained` (offline; nothing is downloaded)."""
        with open(os.path.join(path, PROCESSOR_CONFIG)) as f:
            encoders = json.load(f)["encoders"]
        funcs = dict(num_feature_calculation_funcs or {})
        processors = {}
        for key, spec in encoders.items():
            processors[key] = resolve(spec["processor_class"]).from_pretrained(os.path.join(path, key))
            saved_fn = spec.get("count_function")
            if key not in funcs and saved_fn and saved_fn != UNSERIALIZABLE:
                funcs[key] = resolve(saved_fn)
        specs = {k: s["counter"] for k, s in encoders.items() if s.get("counter")}
        return cls(
            processors, AutoTokenizer.from_pretrained(path), model=model, num_feature_calculation_funcs=funcs,
            predefined_tokens={k: s["token"] for k, s in encoders.items()}, _counter_specs=specs,
        )


def _counter_from_spec(spec: Mapping[str, Any]) -> FeatureCounter:
    config = resolve(spec["config_class"]).from_dict(spec["config"])
    callbacks = [resolve(p) for p in spec.get("callbacks", []) if p != UNSERIALIZABLE]
    return FeatureCounter(config, callbacks)

