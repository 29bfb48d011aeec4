"""The encoded path (``MultimodalDataModule(preprocess=True)``): every sample encoded once, a batch only padded.

At setup, :func:`encode_split` runs :meth:`MultimodalCollator.encode` over a split with ``datasets.Dataset.map``
(media decoded and processed, text templated, tokenized and expanded) and holds the columns in memory as Arrow:
token lists, answer strings, and per-sample ``[items, ...]`` processor outputs (:func:`encoded_features`). A batch
is then one Arrow ``take`` of its rows (:class:`EncodedDataset`), padded and stacked by
:meth:`MultimodalCollator.pad` reading the Arrow columns (:class:`ArrowColumns`, :class:`EncodedCollate`): exactly
the batch the collator makes of the same raw samples.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Array2D, Array3D, Array4D, Array5D, Dataset, Features, List, Value
from datasets.table import MemoryMappedTable

from ..batch import INDEX_KEY
from .collator import MultimodalCollator
from .columns import ANSWERS, TEXT_COLUMNS, EncodedColumns

log = logging.getLogger(__name__)
ENCODE_BATCH = 256  # samples per processor call while encoding a split
ENCODED_WARN_BYTES = 4 * 2**30  # warn when a split's encoded samples would take more memory than this
ARRAYS = {2: Array2D, 3: Array3D, 4: Array4D, 5: Array5D}  # per-sample [items, ...] arrays by dimension


def encode_split(dataset: Dataset, collator: MultimodalCollator, split: str, cache_file: str | None = None) -> Dataset:
    """The split encoded once (:meth:`MultimodalCollator.encode` over batches of samples, via ``Dataset.map``),
    held in memory, or written to ``cache_file`` and memory-mapped. Lengths are left to the caller
    (:func:`encoded_lengths`).

    Args:
        dataset: the split's samples (at least one).
        collator: the split's collator, with no ``max_length`` (over-long samples are kept, to be counted).
        split: the split's name, for messages.
        cache_file: an Arrow file to write the encoded samples to (rewritten at every call); ``None``: in memory.

    Returns:
        One row per sample: the columns of :meth:`MultimodalCollator.encode` with :func:`encoded_features`.

    Raises:
        SampleError: naming the sample and field, for any bad sample (as the collator would at its batch).
        ValueError: if a processor's items vary in shape, or its outputs are not one row per item.
    """
    probe = collator.encode(_probe(dataset, collator.fields))
    features = encoded_features(probe)
    estimate = len(dataset) * max(sum(np.asarray(column[i]).nbytes for column in probe.values())
                                  for i in range(len(probe["input_ids"])))
    if estimate > ENCODED_WARN_BYTES and cache_file is None:
        log.warning("%s: the encoded samples will take about %.1f GiB of memory (processed media included); "
                    "cache_dir keeps them on disk, preprocess=False processes each batch instead", split, estimate / 2**30)

    def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        rows = [{**{k: v[j] for k, v in batch.items()}, INDEX_KEY: i} for j, i in enumerate(indices)]
        columns = collator.encode(rows)
        for name, feature in features.items():
            if name in TEXT_COLUMNS:
                continue
            item_shape, dtype = _item_type(feature)
            arrays = columns.setdefault(name, [np.zeros((0, *item_shape), dtype)] * len(rows))
            for array, i in zip(arrays, indices):
                if array.shape[1:] != item_shape:
                    raise ValueError(f"Sample {i}: processor output {name!r} has items of shape {array.shape[1:]},"
                                     f" others {item_shape}; items of varying shape cannot be encoded ahead: "
                                     f"use MultimodalDataModule(preprocess=False).")
        return columns

    target = dict(keep_in_memory=True) if cache_file is None else dict(cache_file_name=cache_file,
                                                                       load_from_cache_file=False)
    encoded = dataset.map(encode, batched=True, batch_size=ENCODE_BATCH, with_indices=True, features=features,
                          remove_columns=dataset.column_names, desc=f"Encoding {split}", **target)
    log.info("%s: encoded %d samples once (%.1f MB%s)", split, len(encoded), encoded.data.nbytes / 2**20,
             f", memory-mapped from {cache_file}" if cache_file else "")
    return encoded


def encoded_lengths(encoded: Dataset) -> np.ndarray:
    """``[samples]``: the exact token length of each encoded sample (modality spans expanded)."""
    return pc.list_value_length(encoded.data.column("input_ids")).to_numpy(zero_copy_only=False)


def encoded_features(columns: dict[str, list]) -> Features:
    """Arrow types of encoded columns: token lists, answer strings, and per-sample ``[items, ...]`` arrays.

    >>> encoded_features({"input_ids": [[1, 2]], "answers": ["seven"],
    ...                   "pixel_values": [np.zeros((1, 3, 4, 4), np.float32)]})["pixel_values"]
    Array4D(shape=(None, 3, 4, 4), dtype='float32')

    Raises:
        ValueError: for a processor output with items of more than 4 dimensions.
    """
    features = {}
    for name, values in columns.items():
        if name == ANSWERS:
            features[name] = Value("string")
        elif name in TEXT_COLUMNS:
            features[name] = List(Value("int32"))
        else:
            array = next((a for a in values if len(a)), values[0])
            if array.ndim == 1:
                features[name] = List(Value(str(array.dtype)))
            elif array.ndim in ARRAYS:
                features[name] = ARRAYS[array.ndim](shape=(None, *array.shape[1:]), dtype=str(array.dtype))
            else:
                raise ValueError(f"Processor output {name!r} has {array.ndim - 1}-D items; at most 4-D can be "
                                 f"encoded ahead: use MultimodalDataModule(preprocess=False).")
    return Features(features)


class EncodedDataset(torch.utils.data.Dataset):
    """Rows of an encoded split (:func:`encode_split`); a batch is a ``pyarrow.Table`` of its rows that
    :class:`EncodedCollate` pads and stacks.

    In memory, the columns are made one chunk each, so that a batch is one Arrow ``take``. Memory-mapped (an encoded
    split in a ``cache_dir``), the file's record batches stay where they are: a batch takes its rows from the
    record batches holding them (Arrow's ``take`` over many chunks would first concatenate whole columns).
    """

    def __init__(self, dataset: Dataset):
        if dataset._indices is not None:
            dataset = dataset.flatten_indices(keep_in_memory=not isinstance(dataset.data, MemoryMappedTable))
        self.data = dataset.data  # a MemoryMappedTable pickles as its file (workers map it again)
        self.mapped = isinstance(self.data, MemoryMappedTable)
        self._rows: tuple[list[pa.RecordBatch], np.ndarray] | None = None
        # in memory: one chunk per column, a take is one gather
        self.table = None if self.mapped else self.data.table.combine_chunks()

    def __len__(self) -> int:
        return self.data.num_rows

    def __getitem__(self, index: int) -> Any:
        return self.__getitems__([index])

    def __getitems__(self, indices: list[int]) -> Any:
        if self.table is not None:
            return self.table.take(indices)
        if self._rows is None:
            batches = self.data.table.to_batches()
            self._rows = batches, np.cumsum([0] + [b.num_rows for b in batches])
        return take_rows(*self._rows, np.asarray(indices, dtype=np.int64))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_rows": None}


def take_rows(batches: list[pa.RecordBatch], starts: np.ndarray, indices: np.ndarray) -> pa.Table:
    """Rows ``indices`` (in that order) of the table made of ``batches`` (first rows ``starts``): a zero-copy slice
    of the record batch holding each row, then one concatenation per column.

    >>> batches = pa.table({"x": [0, 1, 2, 3, 4]}).to_batches(max_chunksize=2)
    >>> take_rows(batches, np.array([0, 2, 4, 5]), np.array([4, 0, 3, 1])).column("x").to_pylist()
    [4, 0, 3, 1]
    """
    chunks = np.searchsorted(starts, indices, side="right") - 1
    rows = [batches[c].slice(i - starts[c], 1) for c, i in zip(chunks.tolist(), indices.tolist())]
    return pa.Table.from_batches(rows, schema=batches[0].schema).combine_chunks()


class ArrowColumns(EncodedColumns):
    """How :meth:`MultimodalCollator.pad` reads encoded columns stored in Arrow (a ``pyarrow.Table`` of rows of
    :class:`EncodedDataset`): whole columns at once, with no Python loop over samples.

    >>> flat, lengths = ArrowColumns.tokens(pa.chunked_array([[[5, 6, 7]], [[8]]]))
    >>> flat.tolist(), lengths.tolist()
    ([5, 6, 7, 8], [3, 1])
    """

    @staticmethod
    def names(columns: pa.Table) -> list[str]:
        return columns.column_names

    @staticmethod
    def tokens(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
        """An Arrow list column of tokens → (all tokens in order, length per row)."""
        array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
        return array.flatten().to_numpy(zero_copy_only=False), lengths

    @staticmethod
    def items(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """An Arrow ``ArrayXD``/list column of per-sample ``[items, ...]`` arrays → all items concatenated,
        ``[items, ...]``."""
        array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        shape = tuple(getattr(array.type, "shape", (None,))[1:])
        values = array.storage if isinstance(array, pa.ExtensionArray) else array
        while pa.types.is_list(values.type) or pa.types.is_large_list(values.type) or \
                pa.types.is_fixed_size_list(values.type):
            values = values.flatten()
        return np.array(values.to_numpy(zero_copy_only=False)).reshape(-1, *shape)

    @staticmethod
    def strings(column: pa.Array | pa.ChunkedArray) -> list[str]:
        return column.to_pylist()


class EncodedCollate:
    """The ``collate_fn`` of an :class:`EncodedDataset`: a ``pyarrow.Table`` of encoded rows → the batch
    ``collator`` makes of the same raw samples (:meth:`MultimodalCollator.pad` with :class:`ArrowColumns`)."""

    def __init__(self, collator: MultimodalCollator):
        self.collator = collator

    def __call__(self, table: pa.Table) -> dict[str, Any]:
        return self.collator.pad(table, ArrowColumns)


def _probe(dataset: Dataset, fields: dict[str, str]) -> list[dict[str, Any]]:
    """The first sample, and the first with items of each modality it lacks (to learn each output's shape).
    Item counts are read from Arrow (list lengths, or non-null single values): nothing is decoded."""
    columns = {key: name if name in dataset.column_names else name[:-1] for key, name in fields.items()}
    columns = {key: name for key, name in columns.items() if name in dataset.column_names}
    picked, start = [0], 0
    if not columns:
        return [{**dataset[0], INDEX_KEY: 0}]
    for batch in dataset.select_columns(sorted(set(columns.values()))).with_format("arrow").iter(batch_size=4096):
        for key, name in list(columns.items()):
            column = batch.column(name)
            nested = pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
            counts = pc.list_value_length(column).fill_null(0) if nested else pc.cast(column.is_valid(), pa.int32())
            hits = np.flatnonzero(counts.to_numpy(zero_copy_only=False) > 0)
            if len(hits):
                picked.append(start + int(hits[0]))
                del columns[key]
        if not columns:
            break
        start += batch.num_rows
    return [{**dataset[i], INDEX_KEY: i} for i in sorted(set(picked))]


def _item_type(feature: Any) -> tuple[tuple[int, ...], str]:
    """Shape and dtype of one item of an encoded processor-output column (``ArrayXD`` or a list of scalars)."""
    if hasattr(feature, "shape"):
        return tuple(feature.shape[1:]), feature.dtype
    return (), feature.feature.dtype
