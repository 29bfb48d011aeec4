"""Collate raw samples into model batches: media, chat text, placeholder expansion, labels, padding.

A batch is made in two steps: :meth:`MultimodalCollator.encode` turns samples into columns (token lists, answer
strings and per-sample ``[items, ...]`` processor outputs), and :meth:`MultimodalCollator.pad` pads and stacks them.
:mod:`cornstarch.data.encoded` stores the same columns in Arrow once per split and pads them per batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..batch import EVAL_KEYS, IGNORE_INDEX, INDEX_KEY
from .conversation import render_segments, to_messages
from .media import SampleError, load_audio, load_image

ANSWERS, PROMPT_INPUT_IDS, PROMPT_ATTENTION_MASK = EVAL_KEYS  # the eval keys by name

# Sample field holding each modality's items, for the usual modality keys; other keys use f"{key}s".
DEFAULT_FIELDS = {"vision": "images", "image": "images", "audio": "audios", "speech": "audios", "video": "videos"}
MEDIA_FIELDS = frozenset({"images", "audios", "videos"})
# First argument names of audio processors (feature extractors); their items are waveforms.
AUDIO_ARGUMENTS = frozenset({"raw_speech", "audio", "audios"})


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


# Token and text columns of encoded samples; every other column holds processor outputs, one row per item.
TEXT_COLUMNS = frozenset({"input_ids", "labels", PROMPT_INPUT_IDS, ANSWERS})


class EncodedColumns:
    """How :meth:`MultimodalCollator.pad` reads the columns of :meth:`MultimodalCollator.encode` (Python lists).

    ``names(columns)``: the column names; ``tokens(column)``: all tokens in order and the length of each row;
    ``items(column)``: all items concatenated, ``[items, ...]``; ``strings(column)``: a list of strings.
    :class:`cornstarch.data.encoded.ArrowColumns` reads the same columns stored in Arrow.

    >>> flat, lengths = EncodedColumns.tokens([[5, 6, 7], [8]])
    >>> flat.tolist(), lengths.tolist()
    ([5, 6, 7, 8], [3, 1])
    """

    @staticmethod
    def names(columns: Mapping[str, Any]) -> list[str]:
        return list(columns)

    @staticmethod
    def tokens(column: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """A column of token lists → (all tokens in order, length per row)."""
        lengths = np.fromiter((len(row) for row in column), dtype=np.int64, count=len(column))
        flat = (np.concatenate([np.asarray(row, dtype=np.int64) for row in column]) if len(column)
                else np.zeros(0, np.int64))
        return flat, lengths

    @staticmethod
    def items(column: Sequence[np.ndarray]) -> np.ndarray:
        """A column of per-sample ``[items, ...]`` arrays → all items concatenated, ``[items, ...]``."""
        return np.concatenate(list(column)) if len(column) else np.zeros(0)

    @staticmethod
    def strings(column: Sequence[str]) -> list[str]:
        return list(column)


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
        padding_side: ``"right"`` for training, ``"left"`` for generation.
        generate: build prompts only (ending with the assistant prompt) and return the reference ``answers``.
        with_prompts: also return left-padded ``prompt_input_ids``/``prompt_attention_mask`` and ``answers``
            beside the teacher-forced batch (validation: loss and generated exact match from one batch).
        sampling_rate: audio rate the audio processor expects (waveforms are resampled to it).
        processor_kwargs: extra keyword arguments for the encoder processors.
        base_dir: directory that relative media paths are relative to.

    Raises (when called):
        SampleError (a ``ValueError``): naming the sample index and field, for placeholder/item mismatches, missing
            or corrupt files, unsupported file types, empty answers, over-long samples, unknown modalities.

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
    padding_side: str = "right"
    generate: bool = False
    with_prompts: bool = False
    sampling_rate: int = 16000
    processor_kwargs: Mapping[str, Any] = field(default_factory=dict)
    base_dir: str | None = None
    skipped: int = 0

    def __post_init__(self):
        if self.on_too_long not in ("error", "skip"):
            raise ValueError(f"on_too_long must be 'error' or 'skip', got {self.on_too_long!r}.")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}.")
        keys = list(self.processor.encoder_processors)
        self.fields = {**default_fields(keys), **dict(self.fields or {})}
        self._inputs = {key: _first_argument(self.processor.encoder_processors[key]) for key in keys}
        tok = self.processor.tokenizer
        probe = tok("a")["input_ids"]
        self._item_counts: dict[str, int] = {}
        self._bos = [tok.bos_token_id] if tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id] else []

    def _is_audio(self, key: str) -> bool:
        return self._inputs[key] in AUDIO_ARGUMENTS

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
            else:
                items[key] = [load_image(v, index, name, self.base_dir) for v in values]
        return items

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
        fixed-size encoders: every supported vision tower and Whisper-style audio encoder).
        """
        indices = [s.get(INDEX_KEY, i) for i, s in enumerate(samples)]
        tokenized = self._tokenize([self._segments(s, idx) for s, idx in zip(samples, indices)])
        return [len(ids) + sum(n * (self._per_item(key) - 1) for key, n in its.items())
                for (ids, _), its in zip(tokenized, items_per_sample)]

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
        features, counts = self._process(items)
        columns: dict[str, list] = {"input_ids": []}
        if not self.generate:
            columns["labels"] = []
        keep = []
        for i, ((ids, labels), idx) in enumerate(zip(tokenized, indices)):
            ids, labels = self.processor.expand(ids, {k: c[i] for k, c in counts.items()}, labels)
            if self.max_length is not None and len(ids) > self.max_length:
                if self.on_too_long == "error":
                    raise too_long(idx, len(ids), self.max_length)
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
        per_item, shared = _per_sample(features, counts)
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
        batch["input_ids"], batch["attention_mask"] = _pad_tokens(ids, lengths, pad_id, self.padding_side)
        if "labels" in names:
            batch["labels"], _ = _pad_tokens(reader.tokens(columns["labels"])[0], lengths, IGNORE_INDEX,
                                             self.padding_side)
        for name in names:
            if name not in TEXT_COLUMNS:
                items = reader.items(columns[name])  # [items, ...]
                if len(items):
                    batch[name] = torch.from_numpy(items)
        if PROMPT_INPUT_IDS in names:
            prompt, prompt_lengths = reader.tokens(columns[PROMPT_INPUT_IDS])
            batch[PROMPT_INPUT_IDS], batch[PROMPT_ATTENTION_MASK] = _pad_tokens(prompt, prompt_lengths, pad_id, "left")
        if ANSWERS in names:
            batch[ANSWERS] = reader.strings(columns[ANSWERS])
        return batch

    def _process(self, items: list[dict[str, list]]) -> tuple[dict[str, dict], dict[str, list[list[int]]]]:
        """Run each modality's processor once over the batch's items; per-sample feature counts."""
        features, counts = {}, {}
        for key in self.fields:
            flat = [item for its in items for item in its[key]]
            if not flat:
                counts[key] = [[] for _ in items]
                continue
            kwargs = dict(self.processor_kwargs)
            if self._is_audio(key):
                kwargs.setdefault("sampling_rate", self.sampling_rate)
            features[key], per_item = self.processor.process_modality(key, {self._inputs[key]: flat}, **kwargs)
            splits = np.cumsum([0] + [len(its[key]) for its in items])
            counts[key] = [per_item[a:b] for a, b in zip(splits[:-1], splits[1:])]
        return features, counts


def too_long(index: Any, length: int, max_length: int) -> SampleError:
    """The error for a sample longer than ``max_length`` (modality spans expanded)."""
    return SampleError(index, "messages", f"{length} tokens with modality spans expanded, more than "
                                          f"max_length={max_length}; modality spans are never cut.")


def _per_sample(features: dict[str, dict], counts: dict[str, list[list[int]]]) -> tuple[dict[str, list], dict]:
    """Processor outputs split per sample (``[items, ...]`` arrays); outputs not one row per item, kept whole."""
    per_item: dict[str, list[np.ndarray]] = {}
    shared: dict[str, Any] = {}
    for key, tensors in features.items():
        splits = np.cumsum([0] + [len(c) for c in counts[key]])
        for name, value in tensors.items():
            if name in per_item or name in shared:
                raise ValueError(f"Two modality processors output {name!r}; the batch can hold only one.")
            if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == splits[-1]:
                array = value.numpy()
                per_item[name] = [array[a:b] for a, b in zip(splits[:-1], splits[1:])]
            else:
                shared[name] = value
    return per_item, shared


def _pad_tokens(flat: np.ndarray, lengths: np.ndarray, value: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``lengths`` tokens taken in order from ``flat`` → ``[batch, longest]`` padded with ``value``, and the
    mask of real tokens."""
    longest = int(lengths.max()) if len(lengths) else 0
    positions = np.arange(longest)[None, :]  # [1, seq]
    if side == "left":
        real = positions >= (longest - lengths)[:, None]  # [batch, seq]
    else:
        real = positions < lengths[:, None]
    out = np.full(real.shape, value, dtype=np.int64)
    out[real] = flat
    return torch.from_numpy(out), torch.from_numpy(real.astype(np.int64))


def _answer(sample: Mapping[str, Any]) -> str:
    if sample.get("messages"):
        answers = [m["content"] for m in sample["messages"] if m.get("role") == "assistant"]
        return answers[-1] if answers else ""
    return sample.get("answer") or ""
