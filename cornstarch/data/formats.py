"""Readers for the conversation formats instruction-tuning data comes in, mapped onto cornstarch samples.

A cornstarch sample is ``{"messages": [{"role", "content"}, ...], "images": [path, ...]}`` with one placeholder
token (the model's, e.g. ``<image>``) in the text per image, in order. The readers take:

- ``llava`` (LLaVA-Instruct, ShareGPT-style): ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}],
  "image": path}`` or ``"images": [paths]``; ``<image>`` anywhere in the turns (when a row has images but no
  ``<image>`` at all, one per image is put at the start of the first human turn, as LLaVA does). ``sharegpt`` is the
  same reader (``from`` may also be ``user``/``assistant``).
- ``messages`` (OpenAI / Hugging Face chat): ``{"messages": [{"role", "content"}]}``, where ``content`` is a string
  or a list of typed parts: ``{"type": "text", "text": ...}`` and ``{"type": "image", "image"|"path"|"url": ...}``
  or ``{"type": "image_url", "image_url": {"url": ...}}``; an image part without a source takes the next entry of
  the row's ``images``.

Image paths are made absolute against ``image_root`` and must stay inside it. Each bad row raises a
:class:`~cornstarch.data.media.SampleError` naming the row and the field, or is skipped and counted
(``on_bad_row="skip"``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset, Features, IterableDataset, List, Value

from ..batch import INDEX_KEY
from .media import SampleError

log = logging.getLogger(__name__)

FORMATS = ("llava", "sharegpt", "messages")
SOURCE_PLACEHOLDER = "<image>"  # how LLaVA/ShareGPT text marks an image
ROLES_FROM = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
              "system": "system"}
IMAGE_PART_TYPES = ("image", "image_url")


@dataclass
class RowReader:
    """Turns rows of one format into cornstarch samples.

    Args:
        format: ``"llava"``, ``"sharegpt"`` or ``"messages"``.
        placeholder: the model's image placeholder token (the processor's ``tokens["vision"]``).
        image_root: directory relative image paths are relative to; paths must resolve inside it.
        check_files: raise for an image file that does not exist (one ``stat`` per image).
        on_bad_row: ``"error"`` (raise) or ``"skip"`` (drop the row; counted in :attr:`skipped`).

    Raises:
        ValueError: for an unknown format or ``on_bad_row``.

    >>> reader = RowReader("llava", placeholder="<vision>", image_root="/data", check_files=False)
    >>> sample = reader({"image": "a.png", "conversations": [
    ...     {"from": "human", "value": "<image>\\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]}, 0)
    >>> sample["messages"][0]["content"], sample["images"]
    ('<vision>\\nWhat is it?', ['/data/a.png'])
    """

    format: str
    placeholder: str = SOURCE_PLACEHOLDER
    image_root: str | None = None
    check_files: bool = True
    on_bad_row: str = "error"
    skipped: list[tuple[Any, str]] = field(default_factory=list)  # (row, reason) of each skipped row

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"Unknown data format {self.format!r}; formats: {', '.join(FORMATS)}.")
        if self.on_bad_row not in ("error", "skip"):
            raise ValueError(f"on_bad_row must be 'error' or 'skip', got {self.on_bad_row!r}.")
        self._root = os.path.realpath(self.image_root) if self.image_root else None

    def __call__(self, row: dict[str, Any], index: Any) -> dict[str, Any]:
        """The sample of one row.

        Raises:
            SampleError: naming the row and field, for a missing or malformed field, an unknown ``from``/``role``,
                a placeholder count that does not match the images, a missing image or one outside ``image_root``.
        """
        if self.format == "messages":
            messages, images = self._messages(row, index)
        else:
            messages, images = self._conversations(row, index)
        if not any(m["role"] == "assistant" for m in messages):
            raise SampleError(index, "conversations" if self.format != "messages" else "messages",
                              "no assistant turn to learn from.")
        return {"messages": messages, "images": [self._path(p, index, f) for p, f in images]}

    def try_read(self, row: dict[str, Any], index: Any) -> dict[str, Any] | None:
        """The row's sample, or ``None`` for a bad row when skipping (counted in :attr:`skipped`)."""
        try:
            return self(row, index)
        except SampleError as err:
            if self.on_bad_row == "error":
                raise
            self.skipped.append((index, str(err)))
            return None

    # ------------------------------------------------------------------------------------------- formats
    def _conversations(self, row: dict[str, Any], index: Any) -> tuple[list[dict], list[tuple[Any, str]]]:
        turns = row.get("conversations")
        if not isinstance(turns, list) or not turns:
            raise SampleError(index, "conversations", f"expected a non-empty list of turns, got {_kind(turns)}.")
        images = _image_field(row, index)
        messages = []
        for turn, message in enumerate(turns):
            where = f"conversations[{turn}]"
            if not isinstance(message, dict):
                raise SampleError(index, where, f"expected a turn {{'from', 'value'}}, got {_kind(message)}.")
            source = message.get("from", message.get("role"))
            if source not in ROLES_FROM:
                raise SampleError(index, f"{where}.from", f"unknown speaker {source!r}; known: "
                                                          f"{', '.join(ROLES_FROM)}.")
            value = message.get("value", message.get("content"))
            if not isinstance(value, str):
                raise SampleError(index, f"{where}.value", f"expected a string, got {_kind(value)}.")
            messages.append({"role": ROLES_FROM[source], "content": value})
        found = sum(m["content"].count(SOURCE_PLACEHOLDER) for m in messages)
        if found == 0 and images:
            first = next((m for m in messages if m["role"] == "user"), None)
            if first is None:
                raise SampleError(index, "conversations", "the row has images but no human turn to put them in.")
            first["content"] = f"{SOURCE_PLACEHOLDER}\n" * len(images) + first["content"]
        elif found != len(images):
            raise SampleError(index, "conversations", f"{found} {SOURCE_PLACEHOLDER} in the turns but "
                                                      f"{len(images)} image(s).")
        for m in messages:
            m["content"] = m["content"].replace(SOURCE_PLACEHOLDER, self.placeholder)
        return messages, images

    def _messages(self, row: dict[str, Any], index: Any) -> tuple[list[dict], list[tuple[Any, str]]]:
        turns = row.get("messages")
        if not isinstance(turns, list) or not turns:
            raise SampleError(index, "messages", f"expected a non-empty list of messages, got {_kind(turns)}.")
        listed = iter(_image_field(row, index))
        messages, images = [], []
        for turn, message in enumerate(turns):
            where = f"messages[{turn}]"
            role = message.get("role") if isinstance(message, dict) else None
            if role not in ("system", "user", "assistant"):
                raise SampleError(index, f"{where}.role", f"unknown role {role!r}; roles: system, user, assistant.")
            content = message.get("content")
            if isinstance(content, str):
                parts = [{"type": "text", "text": content}]
            elif isinstance(content, list):
                parts = content
            else:
                raise SampleError(index, f"{where}.content", f"expected a string or a list of parts, got "
                                                             f"{_kind(content)}.")
            text: list[str] = []
            for p, part in enumerate(parts):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    text.append(str(part.get("text", "")))
                elif kind in IMAGE_PART_TYPES:
                    source = _part_source(part)
                    image = (source, f"{where}.content[{p}]") if source is not None else next(listed, None)
                    if image is None:
                        raise SampleError(index, f"{where}.content[{p}]", "an image part with no source and no "
                                                                          "more entries in 'images'.")
                    images.append(image)
                    text.append(self.placeholder)
                else:
                    raise SampleError(index, f"{where}.content[{p}].type", f"unknown part type {kind!r}; types: "
                                                                           f"text, image, image_url.")
            messages.append({"role": role, "content": " ".join(t for t in text if t)})
        if next(listed, None) is not None:
            raise SampleError(index, "images", "more entries than image parts in the messages.")
        return messages, images

    def _path(self, value: Any, index: Any, where: str) -> str:
        if not isinstance(value, str) or not value:
            raise SampleError(index, where, f"expected an image path, got {_kind(value)}.")
        if value.startswith("file://"):
            value = value[len("file://"):]
        path = os.path.realpath(os.path.join(self._root, value) if self._root else value)
        if self._root and os.path.commonpath([self._root, path]) != self._root:
            raise SampleError(index, where, f"image path {value!r} is outside the image root {self._root!r}.")
        if self.check_files and not os.path.isfile(path):
            raise SampleError(index, where, f"image file not found: {path!r}.")
        return path


def _image_field(row: dict[str, Any], index: Any) -> list[tuple[Any, str]]:
    """(path, field name) of each image the row lists in ``image`` or ``images``."""
    for name in ("images", "image"):
        value = row.get(name)
        if value is None or value == []:
            continue
        values = value if isinstance(value, list) else [value]
        return [(v, f"{name}[{i}]" if isinstance(value, list) else name) for i, v in enumerate(values)]
    return []


def _part_source(part: dict[str, Any]) -> Any:
    for key in ("image", "path", "url"):
        if isinstance(part.get(key), str):
            return part[key]
    url = part.get("image_url")
    return url.get("url") if isinstance(url, dict) else url


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


SKIP = "__skip__"  # marks a bad row of a stream, dropped after reading
SAMPLE_FEATURES = Features({"messages": List({"role": Value("string"), "content": Value("string")}),
                            "images": List(Value("string"))})


def convert(dataset: Dataset | IterableDataset, reader: RowReader, split: str = "train") -> Dataset | IterableDataset:
    """A dataset of rows in ``reader.format`` as cornstarch samples (``messages``, ``images``), row for row but the
    skipped ones; a map-style dataset is written to the ``datasets`` cache (memory-mapped, not held in memory) and
    its skipped rows logged, a streaming one is converted as it is read.

    Raises:
        SampleError: for the first bad row, naming the row and field (``on_bad_row="error"``).

    >>> rows = Dataset.from_list([{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]},
    ...                           {"conversations": [{"from": "robot", "value": "?"}]}])
    >>> reader = RowReader("llava", on_bad_row="skip")
    >>> len(convert(rows, reader)), reader.skipped[0][1]
    (1, "Sample 1, field 'conversations[0].from': unknown speaker 'robot'; known: human, user, gpt, assistant, model, system.")
    """

    def read(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        rows = ({k: v[j] for k, v in batch.items()} for j in range(len(indices)))
        samples = [s for s in (reader.try_read(r, i) for r, i in zip(rows, indices)) if s is not None]
        return {"messages": [s["messages"] for s in samples], "images": [s["images"] for s in samples]}

    if isinstance(dataset, IterableDataset):  # its columns may be unknown: read row by row, then drop bad rows
        def read_row(row: dict[str, Any], index: int) -> dict[str, Any]:
            sample = reader.try_read(row, index)
            if sample is None:
                return {"messages": [], "images": [], INDEX_KEY: index, SKIP: True}
            return {**sample, INDEX_KEY: index, SKIP: False}  # errors later name the row

        return dataset.map(read_row, with_indices=True, remove_columns=dataset.column_names).filter(
            lambda row: not row[SKIP]).remove_columns([SKIP])
    kwargs = dict(batched=True, with_indices=True, remove_columns=dataset.column_names, features=SAMPLE_FEATURES)
    converted = dataset.map(read, load_from_cache_file=False, desc=f"Reading {split} ({reader.format})", **kwargs)
    if reader.skipped:
        log.warning("%s: skipped %d of %d rows (on_bad_row='skip'); first: %s", split, len(reader.skipped),
                    len(dataset), reader.skipped[0][1])
    return converted
