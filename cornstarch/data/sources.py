"""Where a split's samples come from: a :class:`DatasetSpec` (json, csv, parquet, imagefolder, a local or hub
dataset, a ``"module:function"``) or an in-memory ``datasets.Dataset``."""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset, load_dataset

from ..models.multimodal_language_model.import_paths import resolve
from .formats import SOURCE_PLACEHOLDER, RowReader, convert


@dataclass
class DatasetSpec:
    """Where one split's samples come from.

    Args:
        path: ``"json"``, ``"imagefolder"``, ``"csv"``, ``"parquet"``, a local dataset directory or hub name
            (for ``datasets.load_dataset``), or ``"module:function"`` returning a ``datasets.Dataset``
            (e.g. ``"cornstarch.demo:digits_vlm_dataset"``).
        data_files: files for ``json``/``csv``/``parquet`` (relative media paths are relative to the first file).
        data_dir: directory for ``imagefolder`` (with ``metadata.jsonl``).
        split: the split to read (``"train"``, ``"test"``, …), also passed to a ``module:function``.
        name: the dataset configuration name, if any.
        limit: keep only the first ``limit`` samples.
        kwargs: extra keyword arguments for ``load_dataset`` or the function.
        format: the rows' conversation format, read into cornstarch samples by :mod:`~cornstarch.data.formats`:
            ``"llava"`` (LLaVA-Instruct: ``conversations`` of ``from``/``value`` turns, ``image``/``images``),
            ``"sharegpt"`` (the same reader) or ``"messages"`` (OpenAI-style typed content parts); ``None``: rows
            are cornstarch samples already (``messages`` or ``prompt``/``answer``, ``images``, ``audios``).
        image_root: directory that a format's relative image paths are relative to (default: the data files'
            directory); images must lie inside it.
        on_bad_row: with a ``format``, ``"error"`` (a bad row raises, naming the row and field) or ``"skip"``
            (bad rows are dropped and counted in the log).
        streaming: read the split as a stream (``load_dataset(..., streaming=True)``, or the shards of
            ``path: shards``), for the train split: see :mod:`~cornstarch.data.streaming`.

    >>> DatasetSpec("imagefolder", data_dir="digits").base_dir
    'digits'
    """

    path: str
    data_files: str | list[str] | dict[str, Any] | None = None
    data_dir: str | None = None
    split: str = "train"
    name: str | None = None
    limit: int | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    format: str | None = None
    image_root: str | None = None
    on_bad_row: str = "error"
    streaming: bool = False

    def load(self, placeholder: str | None = None) -> Dataset:
        """Load the split (offline sources need no network), its rows read from ``format`` into samples whose
        images are marked with ``placeholder`` (the model's image token; default ``<image>``).

        Raises:
            ValueError: for a malformed record in a ``json`` split or an ``imagefolder``'s ``metadata.jsonl``,
                naming the file and line.
        """
        if ":" in self.path and not os.path.exists(self.path):
            dataset = resolve(self.path)(split=self.split, **self.kwargs)
        else:
            try:
                dataset = load_dataset(self.path, self.name, data_files=self.data_files, data_dir=self.data_dir,
                                       split=self.split, streaming=self.streaming, **self.kwargs)
            except Exception as err:  # datasets reports a bad record without its file and line
                where = malformed_json(self._json_files())
                if where is None:
                    raise
                raise ValueError(where) from err
        if self.limit is not None:
            dataset = dataset.take(self.limit) if self.streaming else dataset.select(range(min(self.limit,
                                                                                               len(dataset))))
        return convert(dataset, self.reader(placeholder), self.split) if self.format else dataset

    def reader(self, placeholder: str | None = None) -> RowReader:
        """The :class:`~cornstarch.data.formats.RowReader` of this spec's ``format``."""
        return RowReader(self.format or "", placeholder or SOURCE_PLACEHOLDER, self.image_root or self.base_dir,
                         on_bad_row=self.on_bad_row)

    def _json_files(self) -> list[str]:
        """The JSON files this spec reads: a ``json`` split's data files, an ``imagefolder``'s metadata files."""
        if self.path == "json":
            return _file_list(self.data_files)
        if self.path == "imagefolder" and self.data_dir:
            return sorted(glob.glob(os.path.join(self.data_dir, "**", "metadata.json*"), recursive=True))
        return []

    @property
    def base_dir(self) -> str | None:
        """Directory that relative media paths in the data files are relative to."""
        files = self.data_files
        if isinstance(files, dict):
            files = next(iter(files.values()), None)
        if isinstance(files, (list, tuple)):
            files = files[0] if files else None
        return os.path.dirname(os.path.abspath(files)) if isinstance(files, str) else self.data_dir


def _file_list(data_files: str | list[str] | dict[str, Any] | None) -> list[str]:
    """The files ``data_files`` names (globs expanded), in order."""
    if isinstance(data_files, dict):
        data_files = [f for files in data_files.values() for f in ([files] if isinstance(files, str) else files)]
    patterns = [data_files] if isinstance(data_files, str) else list(data_files or [])
    return [f for pattern in patterns for f in sorted(glob.glob(pattern)) or [pattern] if os.path.isfile(f)]


def malformed_json(files: list[str]) -> str | None:
    r"""Where the first malformed record of JSON Lines (or JSON) files is, as a message; None if all parse.

    A file whose first record parses is read as JSON Lines and checked line by line; otherwise as one JSON
    document.

    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
    ...     _ = f.write('{"prompt": "a"}\n{"prompt": }\n')
    >>> print(malformed_json([f.name]).replace(f.name, "train.jsonl"))
    train.jsonl, line 2: malformed JSON (Expecting value at column 12); fix or remove the record.
    >>> os.remove(f.name)
    """
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
        records = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
        try:
            json.loads(records[0][1] if records else "null")
        except json.JSONDecodeError:  # not JSON Lines: one document
            try:
                json.loads("\n".join(lines))
            except json.JSONDecodeError as err:
                return f"{path}, line {err.lineno}: malformed JSON ({err.msg} at column {err.colno}); fix the file."
            continue
        for number, line in records:
            try:
                json.loads(line)
            except json.JSONDecodeError as err:
                return (f"{path}, line {number}: malformed JSON ({err.msg} at column {err.colno}); fix or remove "
                        f"the record.")
    return None


def load_split(source: DatasetSpec | Dataset, placeholder: str | None = None) -> Dataset:
    """A split's samples: loaded from a :class:`DatasetSpec` (``placeholder``: the model's image token, for a
    spec's ``format``), or an in-memory ``datasets.Dataset`` as it is.

    >>> len(load_split(Dataset.from_dict({"prompt": ["a", "b"], "answer": ["c", "d"]})))
    2
    """
    return source.load(placeholder) if isinstance(source, DatasetSpec) else source


def media_dir(source: DatasetSpec | Dataset) -> str | None:
    """Directory that a split's relative media paths are relative to (``None`` for an in-memory dataset)."""
    return source.base_dir if isinstance(source, DatasetSpec) else None
