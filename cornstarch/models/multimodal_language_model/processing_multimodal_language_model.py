"""MultimodalProcessor: each encoder's processor plus the LLM tokenizer, with placeholder expansion."""

from __future__ import annotations

import inspect
import json
import os
import warnings
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np
from transformers import AutoTokenizer, BatchFeature

from ..feature_counts import BUILTIN_COUNTS, FeatureCounter, flatten_counts
from ..pixel_budgets import check_budget
from .import_paths import UNSERIALIZABLE, build_callback, callback_spec, import_path, resolve
from .input_checks import check_distinct_token_ids
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


# First argument names of audio processors (feature extractors): their items are waveforms.
WAVEFORM_ARGUMENTS = ("raw_speech", "audio", "audios")


def audio_window(processor: Any, kwargs: Mapping[str, Any]) -> int | None:
    """How many samples of a clip an audio processor keeps (it cuts the rest), or None if it keeps them all.

    A processor cuts when it truncates (``truncation``, from ``kwargs`` or its default) to ``max_length`` (from
    ``kwargs``) or to its fixed window ``n_samples`` (Whisper-style feature extractors: ``chunk_length`` seconds).

    >>> from transformers import WhisperFeatureExtractor
    >>> audio_window(WhisperFeatureExtractor(), {})  # 30 s at 16 kHz
    480000
    >>> audio_window(WhisperFeatureExtractor(), {"truncation": False}) is None
    True
    """
    truncation = inspect.signature(processor.__call__).parameters.get("truncation")
    default = truncation.default if truncation is not None and truncation.default is not inspect.Parameter.empty \
        else False
    if not kwargs.get("truncation", default):
        return None
    return kwargs.get("max_length") or getattr(processor, "n_samples", None)


def cut_items(waves: Any, window: int | None) -> list[tuple[int, int]]:
    """``(item, length)`` of each waveform longer than ``window`` samples (none when ``window`` is None).

    >>> cut_items([[0.0] * 3, [0.0] * 5], window=4)
    [(1, 5)]
    """
    if window is None or waves is None:
        return []
    waves = waves if isinstance(waves, (list, tuple)) else [waves]
    lengths = [np.asarray(wave).shape[-1] if np.ndim(wave) else 0 for wave in waves]
    return [(item, length) for item, length in enumerate(lengths) if length > window]


def warn_long_audio(key: str, processor: Any, inputs: Mapping[str, Any], kwargs: Mapping[str, Any]) -> None:
    """Warn, naming each item, for waveforms longer than ``processor`` keeps (:func:`audio_window`): it would cut
    them without a word. (The data layer's collator checks before processing and names the sample instead.)"""
    window = audio_window(processor, kwargs)
    waves = next((inputs[name] for name in WAVEFORM_ARGUMENTS if name in inputs), None)
    for item, length in cut_items(waves, window):
        warnings.warn(f"{key} item {item}: {length} samples, but its processor keeps only the first {window} "
                      "(it cuts the rest); shorten the clip or pass truncation=False (and padding) to the "
                      "processor.", stacklevel=3)


class MultimodalProcessor:
    """Turns raw modality items and text into model inputs for a :class:`MultimodalModel`.

    Registers one special token per modality (``<vision>``, ``<audio>``, … or ``predefined_tokens``) without
    dropping the tokenizer's existing special tokens, tells ``model`` their ids, and expands each placeholder into
    as many tokens as its item yields features. Like a transformers processor, it also offers :meth:`decode`,
    :meth:`batch_decode` and :meth:`apply_chat_template` (the LM tokenizer's) and :attr:`model_input_names`.

    The attributes ``encoder_processors``, ``llm_tokenizer`` and ``num_feature_calculation_funcs`` are the very
    objects given (the tokenizer gains the modality tokens); ``tokenizer`` is another name for ``llm_tokenizer``.
    Replacing them after construction is not supported: tokens and counts are worked out when it is built.

    Args:
        encoder_processors: modality key → that encoder's processor (image processor, feature extractor, …).
        llm_tokenizer: the LM's tokenizer.
        model: the :class:`MultimodalModel`; gives the feature counts (built in from each encoder's config and
            callbacks, or, for other families, measured by running the encoder on one item per input shape) and
            receives the token ids.
        num_feature_calculation_funcs: modality key → ``fn(inputs, outputs) -> list[int] | list[list[int]]``
            (features per item, flat or per sample), overriding the built-in count.
        predefined_tokens: modality key → placeholder text, e.g. ``{"vision": "<image>"}``.

    Raises:
        ValueError: if a key names no encoder of ``model``, two modalities' placeholders are the same token
            (or one is the tokenizer's pad, bos, eos or unk token), or an image processor's pixel budget is smaller
            than one patch or its patches are not its tower's (:func:`~cornstarch.models.pixel_budgets.check_budget`).

    >>> from PIL import Image
    >>> from tokenizers import Tokenizer, models, pre_tokenizers
    >>> from transformers import CLIPImageProcessor, PreTrainedTokenizerFast
    >>> backend = Tokenizer(models.WordLevel({"<unk>": 0, "USER:": 1, "what?": 2}, unk_token="<unk>"))
    >>> backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    >>> tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<unk>")
    >>> image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    >>> processor = MultimodalProcessor(
    ...     encoder_processors={"vision": image_processor},
    ...     llm_tokenizer=tokenizer,
    ...     num_feature_calculation_funcs={"vision": lambda inputs, outputs: [4] * len(outputs["pixel_values"])},
    ...     predefined_tokens={"vision": "<image>"},
    ... )
    >>> batch = processor({"vision": {"images": [Image.new("RGB", (40, 40))]}}, {"text": "USER: <image> what?"})
    >>> batch["input_ids"].tolist(), batch["pixel_values"].shape
    ([[1, 3, 3, 3, 3, 2]], torch.Size([1, 3, 32, 32]))
    >>> processor.llm_tokenizer is processor.tokenizer is tokenizer
    True
    >>> processor.decode(batch["input_ids"][0], skip_special_tokens=True)
    'USER: what?'
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
        self.encoder_processors = encoder_processors
        self.llm_tokenizer = llm_tokenizer
        funcs = {} if num_feature_calculation_funcs is None else num_feature_calculation_funcs
        self.num_feature_calculation_funcs = funcs
        predefined = dict(predefined_tokens or {})
        keys = list(encoder_processors)
        if model is not None:
            unknown = set(keys) - set(model.encoders)
            if unknown:
                raise ValueError(f"Processors for {sorted(unknown)}, but the model's encoders are {list(model.encoders)}.")
        self.tokens = {key: predefined.get(key, f"<{key}>") for key in keys}
        new = [t for t in self.tokens.values() if t not in llm_tokenizer.get_vocab()]
        if new:
            llm_tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
        self.token_ids = {key: llm_tokenizer.convert_tokens_to_ids(tok) for key, tok in self.tokens.items()}
        reserved = {f"the tokenizer's {name} token": getattr(llm_tokenizer, f"{name}_token_id", None)
                    for name in ("pad", "bos", "eos", "unk")}
        check_distinct_token_ids(self.token_ids, reserved)
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
                    "callbacks": [callback_spec(cb) for cb in callbacks if cb is not None],
                }
                self.counters[key] = FeatureCounter(encoder.module.config, callbacks, encoder=encoder)
            elif key in self._counter_specs and not _measured(self._counter_specs[key]):
                self.counters[key] = _counter_from_spec(self._counter_specs[key])
            check_budget(key, encoder_processors[key], getattr(self.counters.get(key), "config", None))
        if model is not None:
            model.set_modality_token_ids(self.token_ids)

    @property
    def tokenizer(self) -> Any:
        """The LM tokenizer (the same object as ``llm_tokenizer``), under transformers' processor name."""
        return self.llm_tokenizer

    @tokenizer.setter
    def tokenizer(self, value: Any) -> None:
        self.llm_tokenizer = value

    @property
    def model_input_names(self) -> list[str]:
        """Names of the tensors a call returns: ``input_ids``, ``attention_mask`` (if the tokenizer makes one) and
        each encoder processor's ``model_input_names``, without repeats."""
        names = ["input_ids"] + [n for n in ("attention_mask",) if n in self.tokenizer.model_input_names]
        for processor in self.encoder_processors.values():
            names += list(getattr(processor, "model_input_names", ()))
        return list(dict.fromkeys(names))

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

    # ----------------------------------------------------------------------------------------------- text
    def decode(self, *args: Any, **kwargs: Any) -> str | list[str]:
        """The LM tokenizer's ``decode``: all arguments are passed on (as transformers' processors do).

        Args:
            *args: token ids (a list, array or tensor) and whatever else the tokenizer's ``decode`` takes.
            **kwargs: e.g. ``skip_special_tokens=True`` (which also drops the modality tokens).

        Returns:
            The tokenizer's result: the text.

        >>> from tokenizers import Tokenizer, models
        >>> from transformers import PreTrainedTokenizerFast
        >>> vocab = models.WordLevel({"<unk>": 0, "hello": 1, "world": 2}, unk_token="<unk>")
        >>> processor = MultimodalProcessor({}, PreTrainedTokenizerFast(tokenizer_object=Tokenizer(vocab)))
        >>> processor.decode([1, 2])
        'hello world'
        """
        return self.tokenizer.decode(*args, **kwargs)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        """The LM tokenizer's ``batch_decode``: all arguments are passed on (as transformers' processors do).

        Args:
            *args: a batch of token id sequences, and whatever else the tokenizer's ``batch_decode`` takes.
            **kwargs: e.g. ``skip_special_tokens=True``.

        Returns:
            The tokenizer's result: one text per sequence.

        >>> from tokenizers import Tokenizer, models
        >>> from transformers import PreTrainedTokenizerFast
        >>> vocab = models.WordLevel({"<unk>": 0, "hello": 1, "world": 2}, unk_token="<unk>")
        >>> processor = MultimodalProcessor({}, PreTrainedTokenizerFast(tokenizer_object=Tokenizer(vocab)))
        >>> processor.batch_decode([[1, 2], [2]])
        ['hello world', 'world']
        """
        return self.tokenizer.batch_decode(*args, **kwargs)

    def apply_chat_template(self, conversation: Any, chat_template: str | None = None, tokenize: bool = False,
                            **kwargs: Any) -> Any:
        """The LM tokenizer's ``apply_chat_template``, returning the rendered text unless ``tokenize=True``.

        The conversation goes to the template unchanged: write each item as its placeholder in the text
        (``"<image> What is this?"``), or as a content part (``{"type": "image"}``) if the template renders parts.
        Pass the text to the processor call to expand the placeholders; when the template writes the BOS token
        itself, add ``"add_special_tokens": False`` to ``llm_inputs`` so it is not written twice.

        Args:
            conversation: messages ``[{"role": ..., "content": ...}, ...]``, or a batch of such lists.
            chat_template: a Jinja template to use instead of the tokenizer's.
            tokenize: ``False`` (the default, as for transformers' processors): return the text. ``True``: the
                tokenizer's tokenized result, in which each placeholder is still a single token.
            **kwargs: the tokenizer's other arguments (``add_generation_prompt``, ``return_dict``, ``tools``, …).

        Returns:
            Exactly what ``llm_tokenizer.apply_chat_template`` returns for the same arguments.

        Raises:
            ValueError: if neither ``chat_template`` nor the tokenizer has a template (raised by the tokenizer).

        >>> from tokenizers import Tokenizer, models, pre_tokenizers
        >>> from transformers import CLIPImageProcessor, PreTrainedTokenizerFast
        >>> backend = Tokenizer(models.WordLevel({"<unk>": 0, "USER:": 1, "what?": 2}, unk_token="<unk>"))
        >>> backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        >>> tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
        >>> tokenizer.chat_template = "{% for m in messages %}{{ m['role'].upper() }}: {{ m['content'] }} {% endfor %}"
        >>> processor = MultimodalProcessor({"vision": CLIPImageProcessor()}, tokenizer)
        >>> processor.apply_chat_template([{"role": "user", "content": "<vision> what?"}])
        'USER: <vision> what? '
        >>> processor.apply_chat_template([{"role": "user", "content": "<vision> what?"}], tokenize=True)["input_ids"]
        [1, 3, 2]
        """
        return self.tokenizer.apply_chat_template(
            conversation, chat_template=chat_template, tokenize=tokenize, **kwargs)

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
            if key in self.encoder_processors:
                warn_long_audio(key, self.encoder_processors[key], inputs, kwargs)
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

    # ----------------------------------------------------------------------------------------------- native classes
    @classmethod
    def from_hf(cls, source: Any, model: Any = None) -> "MultimodalProcessor":
        """A processor giving a transformers processor's ``input_ids`` and encoder inputs for the same text and
        media: ``LlavaProcessor``, ``LlavaNextProcessor`` or ``Qwen2AudioProcessor`` (chat template kept).

        Args:
            source: the processor, or a directory (or hub id) it was saved to.
            model: a :class:`MultimodalModel` to tell the token ids (e.g. ``MultimodalModel.from_hf`` 's).

        Returns:
            A processor with the native tokenizer (its chat template set to the processor's) and encoder processor,
            counting features as the native processor does.

        Raises:
            ValueError: for another processor class.

        >>> from PIL import Image
        >>> from tokenizers import Tokenizer, models, pre_tokenizers
        >>> from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast
        >>> backend = Tokenizer(models.WordLevel({"<unk>": 0, "what?": 1, "<image>": 2}, unk_token="<unk>"))
        >>> backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        >>> tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<unk>")
        >>> images = CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
        >>> native = LlavaProcessor(images, tokenizer, patch_size=4, vision_feature_select_strategy="default",
        ...                         num_additional_image_tokens=1)  # 2x2 patches (+ CLS, dropped)
        >>> processor = MultimodalProcessor.from_hf(native)
        >>> processor({"vision": {"images": [Image.new("RGB", (8, 8))]}}, {"text": "<image> what?"})["input_ids"]
        tensor([[2, 2, 2, 2, 1]])
        >>> type(processor.to_hf()).__name__
        'LlavaProcessor'
        """
        from ..hf import processor_from_hf

        return processor_from_hf(source, model=model)

    def to_hf(self) -> Any:
        """The transformers processor giving the same ``input_ids`` and encoder inputs.

        Returns:
            A ``LlavaProcessor``, ``LlavaNextProcessor`` or ``Qwen2AudioProcessor`` sharing this processor's
            tokenizer and encoder processor (example: :meth:`from_hf`).

        Raises:
            ValueError: naming what has no native equivalent (several encoder processors, a feature count).
        """
        from ..hf import processor_to_hf

        return processor_to_hf(self)

    # ----------------------------------------------------------------------------------------------- save / load
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write the tokenizer, each encoder processor (in ``{key}/``) and ``cornstarch_processor.json``.

        The JSON records each modality's processor class, placeholder token and how its features are counted:
        the encoder config and callbacks behind a built-in count, or the import path of a module-level function
        from ``num_feature_calculation_funcs``. Lambdas, closures and bound methods cannot be saved; give them to
        :meth:`from_pretrained` again.

        Args:
            save_directory: the directory (created if missing).
        """
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
                "count_function": callback_spec(counter) if counter is not None and key not in self._counter_specs else None,
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
        """Load a processor written by :meth:`save_pretrained` (offline; nothing is downloaded).

        Args:
            path: the directory.
            model: a :class:`MultimodalModel` to tell the token ids (and count features from), as in the constructor.
            num_feature_calculation_funcs: count functions, in place of the saved ones (needed for those that could
                not be saved).

        Returns:
            A processor whose ``llm_tokenizer`` is the saved tokenizer (modality tokens included), whose
            ``encoder_processors`` is a dict of the saved processors, and whose ``num_feature_calculation_funcs``
            holds the given functions plus the saved module-level ones. Built-in counts come back from the saved
            encoder configs, so no model is needed to process inputs.
        """
        with open(os.path.join(path, PROCESSOR_CONFIG)) as f:
            encoders = json.load(f)["encoders"]
        funcs = dict(num_feature_calculation_funcs or {})
        processors = {}
        for key, spec in encoders.items():
            processors[key] = resolve(spec["processor_class"]).from_pretrained(os.path.join(path, key))
            saved_fn = spec.get("count_function")
            if key not in funcs and saved_fn and saved_fn != UNSERIALIZABLE:
                funcs[key] = build_callback(saved_fn)
        specs = {k: s["counter"] for k, s in encoders.items() if s.get("counter")}
        return cls(
            processors, AutoTokenizer.from_pretrained(path), model=model, num_feature_calculation_funcs=funcs,
            predefined_tokens={k: s["token"] for k, s in encoders.items()}, _counter_specs=specs,
        )


def _measured(spec: Mapping[str, Any]) -> bool:
    """Whether a saved counter spec is for a family counted by running its encoder (then a model is needed)."""
    return resolve(spec["config_class"]).model_type not in BUILTIN_COUNTS


def _counter_from_spec(spec: Mapping[str, Any]) -> FeatureCounter:
    config = resolve(spec["config_class"]).from_dict(spec["config"])
    callbacks = [build_callback(p) for p in spec.get("callbacks", []) if p != UNSERIALIZABLE]
    return FeatureCounter(config, callbacks)

