"""Collate raw samples into model batches: media, chat text, placeholder expansion, labels, padding.

A batch is made in two steps: :meth:`MultimodalCollator.encode` turns samples into columns (token lists, answer
strings and per-sample ``[items, ...]`` processor outputs), and :meth:`MultimodalCollator.pad` pads and stacks them.
:mod:`cornstarch.data.encoded` stores the same columns in Arrow once per split and pads them per batch.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..batch import IGNORE_INDEX, INDEX_KEY
from ..models.dynamic_resolution import padded_images
from ..models.pixel_budgets import check_budget, features_for_size, pixel_budget
from ..models.multimodal_language_model.processing_multimodal_language_model import (WAVEFORM_ARGUMENTS,
                                                                                    audio_window, cut_items)
from .columns import (ANSWERS, PROMPT_ATTENTION_MASK, PROMPT_INPUT_IDS, TEXT_COLUMNS, EncodedColumns, pad_tokens,
                      padded_family, per_sample)
from .conversation import render_segments, to_messages
from .media import SampleError, SampleWarning, image_size, load_audio, load_image, sample_message
from .video import load_video

# Sample field holding each modality's items, for the usual modality keys; other keys use f"{key}s".
DEFAULT_FIELDS = {"vision": "images", "image": "images", "audio": "audios", "speech": "audios", "video": "videos"}
MEDIA_FIELDS = frozenset({"images", "audios", "videos"})
VIDEO_ARGUMENT = "videos"  # first argument of video processors: their items are decoded, sampled frames
LONG_AUDIO_REPORTED = 5  # clips longer than the audio processor keeps: warnings (naming the sample) per collator


def default_fields(keys: Sequence[str]) -> dict[str, str]:
    """Modality key → sample field.

    >>> default_fields(["vision", "audio", "depth"])
    {'vision': 'images', 'audio': 'audios', 'depth': 'depths'}
    """
    return {key: DEFAULT_FIELDS.get(key, f"{key}s") for key in keys}


def field_values(sample: Mapping[str, Any], name: str) -> list[Any]:
    """The items a sample holds in field ``name`` (or its singular, e.g. imagefolder's ``image``), as a list.

    >>> field_values({"image": "a.png"}, "images"), field_values({}, "audios")
    (['a.png'], [])
    """
    values = sample.get(name)
    if values is None and name.endswith("s"):
        values = sample.get(name[:-1])
    if values is None:
        return []
    return list(values) if isinstance(values, (list, tuple)) else [values]


def _first_argument(processor: Any) -> str:
    params = [p for p in inspect.signature(processor.__call__).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return params[0].name


LENGTH_BATCH = 64  # samples per processor call when measuring the lengths of variable-resolution items

@dataclass
class MultimodalCollator:
    """Turns a list of samples into ``input_ids``, ``attention_mask``, ``labels`` and per-modality tensors.

    A sample is ``{"messages": [...]}`` or ``{"prompt": ..., "answer": ...}`` plus a list of items per modality
    field (``images``, ``audios``; see ``fields``). Only answers are supervised: prompt, modality tokens and
    padding are ``IGNORE_INDEX`` (-100). Modality tokens per sample are counted here, on the CPU.
    ``collate(samples)`` is ``collate.pad(collate.encode(samples))``: :meth:`encode` does the per-sample work (media,
    template, tokens, expansion), which :class:`MultimodalDataModule` runs once per sample at setup; :meth:`pad` pads
    and stacks.

    Args:
        processor: the :class:`MultimodalProcessor` (tokenizer, encoder processors, token ids, feature counts).
        fields: modality key → sample field; default ``vision→images``, ``audio→audios``, other ``key→keys``.
        max_length: longest allowed sequence; ``None`` for no limit. Modality spans are never cut.
        on_too_long: ``"error"`` (raise, naming the sample) or ``"skip"`` (drop it; counted in ``skipped``).
        on_long_audio: for a clip longer than the audio processor's window (:func:`audio_window`; the encoder
            would see only its start): ``"warn"`` (a :class:`~cornstarch.data.media.SampleWarning` naming the
            sample, for the first ``LONG_AUDIO_REPORTED`` such clips; all are counted in ``long_audio``) or
            ``"error"`` (raise, naming it).
        padding_side: ``"right"`` for training, ``"left"`` for generation.
        generate: build prompts only (ending with the assistant prompt) and return the reference ``answers``.
        with_prompts: also return left-padded ``prompt_input_ids``/``prompt_attention_mask`` and ``answers``
            beside the teacher-forced batch (validation: loss and generated exact match from one batch).
        sampling_rate: audio rate the audio processor expects (waveforms are resampled to it).
        processor_kwargs: extra keyword arguments for the encoder processors.
        base_dir: directory that relative media paths are relative to.

    Raises (when called):
        SampleError (a ``ValueError``): naming the sample index and field, for placeholder/item mismatches, missing
            or corrupt files, unsupported file types, empty answers, over-long samples, unknown modalities, media
            that cannot be read (:func:`~cornstarch.data.media.load_image`, :func:`~cornstarch.data.media.
            load_audio`), and over-long audio with ``on_long_audio="error"``.

    >>> from PIL import Image
    >>> from transformers import CLIPImageProcessor
    >>> from cornstarch.demo import demo_tokenizer
    >>> from cornstarch.models.multimodal_language_model import MultimodalProcessor
    >>> images = CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    >>> processor = MultimodalProcessor({"vision": images}, demo_tokenizer(), predefined_tokens={"vision": "<image>"},
    ...                                 num_feature_calculation_funcs={"vision": lambda i, o: [4] * len(i["images"])})
    >>> collate = MultimodalCollator(processor, max_length=256)
    >>> batch = collate([{"prompt": "<image> Which digit?", "answer": "seven", "images": [Image.new("RGB", (8, 8))]}])
    >>> int((batch["input_ids"] == processor.token_ids["vision"]).sum()), tuple(batch["pixel_values"].shape)
    (4, (1, 3, 8, 8))
    >>> labels = batch["labels"][0]
    >>> processor.tokenizer.decode(labels[labels != -100])  # only what the template adds for the answer turn
    ' seven</s>\\n'
    """

    processor: Any
    fields: Mapping[str, str] | None = None
    max_length: int | None = None
    on_too_long: str = "error"
    on_long_audio: str = "warn"
    padding_side: str = "right"
    generate: bool = False
    with_prompts: bool = False
    sampling_rate: int = 16000
    processor_kwargs: Mapping[str, Any] = field(default_factory=dict)
    base_dir: str | None = None
    skipped: int = 0
    long_audio: int = 0

    def __post_init__(self):
        if self.on_too_long not in ("error", "skip"):
            raise ValueError(f"on_too_long must be 'error' or 'skip', got {self.on_too_long!r}.")
        if self.on_long_audio not in ("warn", "error"):
            raise ValueError(f"on_long_audio must be 'warn' or 'error', got {self.on_long_audio!r}.")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}.")
        keys = list(self.processor.encoder_processors)
        self.fields = {**default_fields(keys), **dict(self.fields or {})}
        for key in keys:  # a per-call pixel budget smaller than one patch is a configuration error
            check_budget(key, self.processor.encoder_processors[key], overrides=self.processor_kwargs)
        self._inputs = {key: _first_argument(self.processor.encoder_processors[key]) for key in keys}
        self._windows = {key: audio_window(self.processor.encoder_processors[key], self.processor_kwargs)
                         for key in keys if self._is_audio(key)}
        tok = self.processor.tokenizer
        probe = tok("a")["input_ids"]
        self._item_counts: dict[str, int] = {}
        self._bos = [tok.bos_token_id] if tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id] else []

    def _is_audio(self, key: str) -> bool:
        return self._inputs[key] in WAVEFORM_ARGUMENTS

    # ----------------------------------------------------------------------------------------------- per sample
    def _items(self, sample: Mapping[str, Any], index: Any) -> dict[str, list[Any]]:
        unknown = [f for f in sample if f in MEDIA_FIELDS - set(self.fields.values()) and sample[f]]
        if unknown:
            raise SampleError(index, unknown[0], f"the model has no encoder for this modality "
                                                 f"(encoders: {list(self.fields)}).")
        items = {}
        for key, name in self.fields.items():
            values = field_values(sample, name)
            if self._is_audio(key):
                rate = sample.get("sampling_rate") or self.sampling_rate
                values = [{"array": v, "sampling_rate": rate} if isinstance(v, (list, np.ndarray)) else v for v in values]
                items[key] = [load_audio(v, index, name, self.sampling_rate, self.base_dir) for v in values]
                self._check_window(key, items[key], index, name)
            elif self._inputs[key] == VIDEO_ARGUMENT:  # frames sampled as the video processor says
                sampling = {k: getattr(self.processor.encoder_processors[key], k, None) for k in ("fps", "max_frames")}
                items[key] = [load_video(v, index, name, self.base_dir, **sampling) for v in values]
            else:
                items[key] = [load_image(v, index, name, self.base_dir) for v in values]
        return items

    def _check_window(self, key: str, waves: list[np.ndarray], index: Any, name: str) -> None:
        """Warn about (or refuse, with ``on_long_audio="error"``) clips longer than the audio processor's window."""
        window = self._windows.get(key)
        for item, length in cut_items(waves, window):
            problem = (f"audio item {item} lasts {length / self.sampling_rate:.2f} s ({length} samples) but "
                       f"the {key} processor keeps only the first {window / self.sampling_rate:.2f} s ({window} "
                       f"samples) and cuts the rest; trim or split the clip (one placeholder per part)")
            if self.on_long_audio == "error":
                raise SampleError(index, name, problem + ".")
            self.long_audio += 1
            if self.long_audio <= LONG_AUDIO_REPORTED:
                last = " This is the last clip reported; long_audio counts them all." \
                    if self.long_audio == LONG_AUDIO_REPORTED else ""
                warnings.warn(sample_message(index, name, f"{problem}, or set on_long_audio='error' to refuse "
                                                          f"such clips.{last}"), SampleWarning, stacklevel=4)

    def _segments(self, sample: Mapping[str, Any], index: Any, prompt_only: bool | None = None) -> list[tuple[str, bool]]:
        prompt_only = self.generate if prompt_only is None else prompt_only
        messages = to_messages(dict(sample), index, need_answer=not self.generate)
        return render_segments(self.processor.tokenizer, messages, index, generation_prompt=prompt_only)

    def _tokenize(self, segments: list[list[tuple[str, bool]]]) -> list[tuple[list[int], list[int]]]:
        """All samples' segments in one tokenizer call → per sample (ids, labels) with one placeholder per item."""
        texts = [text for sample in segments for text, _ in sample]
        encoded = iter(self.processor.tokenizer(texts, add_special_tokens=False)["input_ids"])
        bos_text = self.processor.tokenizer.bos_token
        out = []
        for sample in segments:
            ids, labels = [], []
            for text, supervised in sample:
                seg = next(encoded)
                ids += seg
                labels += seg if supervised else [IGNORE_INDEX] * len(seg)
            if self._bos and not (bos_text and sample and sample[0][0].startswith(bos_text)):
                ids, labels = self._bos + ids, [IGNORE_INDEX] + labels
            out.append((ids, labels))
        return out

    def _check_placeholders(self, ids: list[int], items: Mapping[str, list], index: Any) -> None:
        for key, token_id in self.processor.token_ids.items():
            found = int(np.count_nonzero(np.asarray(ids) == token_id))
            given = len(items[key])
            if found != given:
                raise SampleError(index, self.fields[key], f"{found} {self.processor.tokens[key]} placeholder(s) in the "
                                                           f"text but {given} item(s).")

    def lengths(self, samples: Sequence[Mapping[str, Any]], items_per_sample: Sequence[Mapping[str, int]]) -> list[int]:
        """Token length of each sample with placeholders expanded, from its text and item counts only.

        Each item is taken to yield as many features as the first item of its modality processed here (exact for
        fixed-size encoders: Whisper-style audio encoders and the vision towers with a fixed input size). Images of
        variable-resolution towers (:mod:`cornstarch.models.dynamic_resolution`) are counted one by one from their
        size under the processor's pixel budget (read from their headers), or processed where the size does not tell.
        """
        indices = [s.get(INDEX_KEY, i) for i, s in enumerate(samples)]
        tokenized = self._tokenize([self._segments(s, idx) for s, idx in zip(samples, indices)])
        varying = [key for key in self.fields if getattr(self.processor.counters.get(key), "varies", False)]
        extra = self._varying_extra(samples, indices, varying) if varying else [0] * len(samples)
        return [len(ids) + more + sum(n * (self._per_item(key) - 1) for key, n in its.items()
                           if n and key not in varying)
                for (ids, _), its, more in zip(tokenized, items_per_sample, extra)]

    def _varying_extra(self, samples: Sequence[Mapping[str, Any]], indices: list[Any], keys: list[str]) -> list[int]:
        """Per sample, the tokens its ``keys`` items add beyond one placeholder each: from each image's size and
        its processor's pixel budget (:func:`~cornstarch.models.pixel_budgets.features_for_size`: headers read, no
        pixel decoded), or, where the size does not tell, by processing the sample's items."""
        extra = []
        for start in range(0, len(samples), LENGTH_BATCH):  # setup, on the CPU: a batch of samples at a time
            chunk = list(range(start, min(start + LENGTH_BATCH, len(samples))))
            sized = [self._extra_from_sizes(samples[i], indices[i], keys) for i in chunk]
            unsized = [i for i, n in zip(chunk, sized) if n is None]
            if unsized:
                items = [{k: v if k in keys else [] for k, v in self._items(samples[i], indices[i]).items()}
                         for i in unsized]
                _, counts = self._process(items, [indices[i] for i in unsized])
                processed = iter(sum(sum(counts[k][j]) - len(counts[k][j]) for k in keys) for j in range(len(unsized)))
                sized = [next(processed) if n is None else n for n in sized]
            extra += sized
        return extra

    def _extra_from_sizes(self, sample: Mapping[str, Any], index: Any, keys: list[str]) -> int | None:
        """The tokens ``keys`` items add beyond one placeholder each, from the images' sizes, or None."""
        extra = 0
        for key in keys:
            processor, counter = self.processor.encoder_processors[key], self.processor.counters[key]
            if getattr(counter, "callbacks", None) or pixel_budget(processor, self.processor_kwargs) is None:
                return None  # callbacks that change counts, or no budget: only processing tells
            name = self.fields[key]
            for value in field_values(sample, name):
                width, height = image_size(value, index, name, self.base_dir)
                count = features_for_size(processor, height, width, self.processor_kwargs)
                if count is None:
                    return None
                extra += count - 1
        return extra

    def _per_item(self, key: str) -> int:
        if key not in self._item_counts:
            raise ValueError(f"No {key} item seen yet; call remember_item_count first.")
        return self._item_counts[key]

    def remember_item_count(self, key: str, sample: Mapping[str, Any]) -> None:
        """Process one item of ``sample`` to learn how many features a ``key`` item yields."""
        items = self._items(sample, sample.get(INDEX_KEY, 0))
        _, counts = self._process([{k: v[:1] if k == key else [] for k, v in items.items()}])
        self._item_counts[key] = counts[key][0][0]

    # ----------------------------------------------------------------------------------------------- batch
    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        columns, shared = self._encode(samples)
        batch = self.pad(columns)
        batch.update(shared)
        return batch

    def encode(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, list]:
        """Each sample's model inputs, unpadded: the per-sample work of a batch, done once (see :meth:`pad`).

        Returns:
            Columns, one entry per kept sample: ``input_ids`` (placeholders expanded), ``labels`` (unless
            ``generate``), ``prompt_input_ids`` (with ``with_prompts``), ``answers`` (with ``generate`` or
            ``with_prompts``), and each modality processor output as an ``[items, ...]`` array (``pixel_values``…).

        Raises:
            SampleError: as :meth:`__call__`.
            ValueError: if a processor output is not one row per item (such outputs cannot be stored per sample).
        """
        columns, shared = self._encode(samples)
        if shared:
            raise ValueError(f"Processor outputs {sorted(shared)} are not one row per item, so samples cannot be "
                             f"encoded one by one; collate raw samples instead (MultimodalDataModule(preprocess=False)).")
        return columns

    def _encode(self, samples: Sequence[Mapping[str, Any]]) -> tuple[dict[str, list], dict[str, Any]]:
        """Columns of :meth:`encode`, and processor outputs that are not one row per item (kept whole)."""
        indices = [s.get(INDEX_KEY, i) for i, s in enumerate(samples)]
        items = [self._items(s, idx) for s, idx in zip(samples, indices)]
        tokenized = self._tokenize([self._segments(s, idx) for s, idx in zip(samples, indices)])
        for (ids, _), its, idx in zip(tokenized, items, indices):
            self._check_placeholders(ids, its, idx)
        features, counts = self._process(items, indices)
        columns: dict[str, list] = {"input_ids": []}
        if not self.generate:
            columns["labels"] = []
        keep = []
        for i, ((ids, labels), idx) in enumerate(zip(tokenized, indices)):
            ids, labels = self.processor.expand(ids, {k: c[i] for k, c in counts.items()}, labels)
            if self.max_length is not None and len(ids) > self.max_length:
                if self.on_too_long == "error":
                    raise too_long(idx, ids, self.max_length, self.processor.token_ids, self.fields)
                self.skipped += 1
                continue
            columns["input_ids"].append(ids)
            if not self.generate:
                columns["labels"].append(labels)
            keep.append(i)
        if self.with_prompts and not self.generate:
            prompts = self._tokenize([self._segments(samples[i], indices[i], prompt_only=True) for i in keep])
            columns[PROMPT_INPUT_IDS] = [self.processor.expand(ids, {k: c[i] for k, c in counts.items()})[0]
                                         for (ids, _), i in zip(prompts, keep)]
        if self.generate or self.with_prompts:
            columns[ANSWERS] = [_answer(samples[i]) for i in keep]
        cropped = {key for key in features if padded_family(self.processor.counters.get(key))}
        per_item, shared = per_sample(features, counts, cropped)
        for name, arrays in per_item.items():
            if name in columns:
                raise ValueError(f"Processor output {name!r} clashes with another column; rename the modality.")
            columns[name] = [arrays[i] for i in keep]
        return columns, shared

    @property
    def pad_token_id(self) -> int:
        """The id padding fills rows with: the tokenizer's pad token, else 0."""
        pad_id = self.processor.tokenizer.pad_token_id
        return 0 if pad_id is None else pad_id

    def pad(self, columns: Any, reader: type[EncodedColumns] = EncodedColumns) -> dict[str, Any]:
        """Pad and stack encoded samples (columns of :meth:`encode`) into a batch.

        Each token column is flattened once and scattered into a padded matrix.

        Args:
            columns: the columns of :meth:`encode` (Python lists), or the same columns in another container.
            reader: how to read ``columns``: :class:`EncodedColumns` (the default) for :meth:`encode`'s lists;
                :class:`cornstarch.data.encoded.ArrowColumns` for a ``pyarrow.Table`` of encoded rows (no Python
                loop over samples).

        Returns:
            ``input_ids``/``attention_mask`` ``[batch, seq]`` (padded on ``padding_side``), ``labels`` (padded with
            ``IGNORE_INDEX``), left-padded ``prompt_input_ids``/``prompt_attention_mask``, ``answers``, and each
            processor output concatenated over the batch's items (``pixel_values`` ``[items, channels, height,
            width]``, …).
        """
        names = reader.names(columns)
        pad_id = self.pad_token_id
        ids, lengths = reader.tokens(columns["input_ids"])
        batch = {}
        batch["input_ids"], batch["attention_mask"] = pad_tokens(ids, lengths, pad_id, self.padding_side)
        if "labels" in names:
            batch["labels"], _ = pad_tokens(reader.tokens(columns["labels"])[0], lengths, IGNORE_INDEX,
                                             self.padding_side)
        for name in names:
            if name not in TEXT_COLUMNS:
                items = reader.items(columns[name])  # [items, ...]
                if len(items):
                    batch[name] = torch.from_numpy(items)
        if "pixel_values" in batch and batch["pixel_values"].ndim == 1 and "image_sizes" in batch:  # cropped images
            batch["pixel_values"] = torch.from_numpy(padded_images(batch["pixel_values"].numpy(),
                                                                   batch["image_sizes"].numpy()))
        if PROMPT_INPUT_IDS in names:
            prompt, prompt_lengths = reader.tokens(columns[PROMPT_INPUT_IDS])
            batch[PROMPT_INPUT_IDS], batch[PROMPT_ATTENTION_MASK] = pad_tokens(prompt, prompt_lengths, pad_id, "left")
        if ANSWERS in names:
            batch[ANSWERS] = reader.strings(columns[ANSWERS])
        return batch

    def _process(self, items: list[dict[str, list]],
                 indices: Sequence[Any] | None = None) -> tuple[dict[str, dict], dict[str, list[list[int]]]]:
        """Run each modality's processor once over the batch's items; per-sample feature counts.

        Raises:
            SampleError: naming the sample and field of the first item the processor refuses (an image too
                small or too elongated for the tower's patches, …), with the processor's message.
        """
        features, counts = {}, {}
        for key in self.fields:
            flat = [item for its in items for item in its[key]]
            if not flat:
                counts[key] = [[] for _ in items]
                continue
            kwargs = dict(self.processor_kwargs)
            if self._is_audio(key):
                kwargs.setdefault("sampling_rate", self.sampling_rate)
            try:
                features[key], per_item = self.processor.process_modality(key, {self._inputs[key]: flat}, **kwargs)
            except ValueError as err:
                raise self._refused(key, items, indices, kwargs) or err
            splits = np.cumsum([0] + [len(its[key]) for its in items])
            counts[key] = [per_item[a:b] for a, b in zip(splits[:-1], splits[1:])]
        return features, counts

    def _refused(self, key: str, items: list[dict[str, list]], indices: Sequence[Any] | None,
                 kwargs: Mapping[str, Any]) -> SampleError | None:
        """The first ``key`` item its processor refuses on its own, as an error naming its sample (error path)."""
        indices = range(len(items)) if indices is None else indices
        for its, index in zip(items, indices):
            for item in its[key]:
                try:
                    self.processor.process_modality(key, {self._inputs[key]: [item]}, **kwargs)
                except ValueError as err:
                    size = f" of {item.width}×{item.height} pixels" if hasattr(item, "width") else ""
                    return SampleError(index, self.fields[key], f"the {key} processor refuses this item{size}: {err}")
        return None


def too_long(index: Any, ids: Sequence[int], max_length: int, modality_ids: Mapping[str, int],
             fields: Mapping[str, str] | None = None) -> SampleError:
    """The error for a sample longer than ``max_length`` (modality spans expanded), naming its media's tokens.

    Args:
        index: the sample's index.
        ids: its token ids, placeholders expanded.
        max_length: the limit.
        modality_ids: modality key → placeholder token id (``MultimodalProcessor.token_ids``).
        fields: modality key → sample field (default: :func:`default_fields`).

    Returns:
        A :class:`~cornstarch.data.media.SampleError` for field ``messages``, or for the media's fields when the
        media alone exceed ``max_length`` (then no text can fit either: lower the pixel budget or raise the limit).

    >>> print(too_long(3, [1, 9, 9, 9, 2], 4, {"vision": 9}))
    Sample 3, field 'messages': 5 tokens with modality spans expanded, more than max_length=4; modality spans are never cut. Its media take 3 tokens (vision 3).
    >>> print(too_long(3, [1, 9, 9, 9, 9, 9, 2], 4, {"vision": 9}))
    Sample 3, field 'images': its media alone take 5 tokens (vision 5), more than max_length=4 (7 tokens in all); modality spans are never cut. Give it fewer media, lower their pixel budget (max_pixels, max_num_patches, longest_edge) or raise max_length.
    """
    found = np.asarray(ids)
    media = {key: int(np.count_nonzero(found == token)) for key, token in modality_ids.items()}
    parts = ", ".join(f"{key} {n}" for key, n in media.items() if n)
    total = sum(media.values())
    if total > max_length:
        fields = {**default_fields(list(modality_ids)), **dict(fields or {})}
        named = ", ".join(fields[key] for key, n in media.items() if n)
        return SampleError(index, named, f"its media alone take {total} tokens ({parts}), more than "
                                           f"max_length={max_length} ({len(ids)} tokens in all); modality spans are "
                                           "never cut. Give it fewer media, lower their pixel budget (max_pixels, "
                                           "max_num_patches, longest_edge) or raise max_length.")
    return SampleError(index, "messages", f"{len(ids)} tokens with modality spans expanded, more than "
                                          f"max_length={max_length}; modality spans are never cut."
                                          + (f" Its media take {total} tokens ({parts})." if total else ""))


def _answer(sample: Mapping[str, Any]) -> str:
    if sample.get("messages"):
        answers = [m["content"] for m in sample["messages"] if m.get("role") == "assistant"]
        return answers[-1] if answers else ""
    return sample.get("answer") or ""
