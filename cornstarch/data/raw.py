"""The raw path (``MultimodalDataModule(preprocess=False)``): samples collated batch by batch.

:class:`IndexedDataset` reads a batch's samples with their row index (so errors name the sample), and the
:class:`~cornstarch.data.collator.MultimodalCollator` does all the per-sample work in the loader, every epoch.
:func:`sample_lengths` measures the samples' token lengths at setup (for length grouping, packing and skipping
over-long samples) from their text and item counts, without decoding any media but one item per modality.
"""

from __future__ import annotations

from typing import Any

import torch
from datasets import Dataset
from datasets import Image as ImageFeature

from ..batch import INDEX_KEY
from .collator import MultimodalCollator, field_values


class IndexedDataset(torch.utils.data.Dataset):
    """A ``datasets.Dataset`` whose rows carry their index as ``INDEX_KEY`` (errors name it).

    >>> rows = IndexedDataset(Dataset.from_dict({"prompt": ["a", "b", "c"]}))
    >>> rows[2], rows.__getitems__([0, 1])
    ({'prompt': 'c', '__index__': 2}, [{'prompt': 'a', '__index__': 0}, {'prompt': 'b', '__index__': 1}])
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.dataset[int(index)], INDEX_KEY: int(index)}

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        """A whole batch in one Arrow read (the DataLoader uses it when present): far fewer Python calls."""
        columns = self.dataset[[int(i) for i in indices]]
        return [{**{k: v[j] for k, v in columns.items()}, INDEX_KEY: int(i)} for j, i in enumerate(indices)]


def sample_lengths(dataset: Dataset, collator: MultimodalCollator) -> list[int]:
    """Token length of each sample with placeholders expanded (see :meth:`MultimodalCollator.lengths`).

    Items are counted without decoding; the first item of each modality is processed to learn how many features
    an item yields.
    """
    fields = collator.fields
    light = without_decoding(dataset)
    rows = [{**r, INDEX_KEY: i} for i, r in enumerate(light)]
    items = [{key: len(field_values(r, name)) for key, name in fields.items()} for r in rows]
    for key in fields:
        first = next((i for i, its in enumerate(items) if its[key]), None)
        if first is not None:
            collator.remember_item_count(key, {**dataset[first], INDEX_KEY: first})
    return collator.lengths(rows, items)


def without_decoding(dataset: Dataset) -> Dataset:
    """The dataset with image columns (single or lists) left undecoded: counting items needs no pixels."""
    for name, feature in dataset.features.items():
        light = _undecoded(feature)
        if light is not None:
            dataset = dataset.cast_column(name, light)
    return dataset


def _undecoded(feature: Any) -> Any:
    if isinstance(feature, ImageFeature):
        return ImageFeature(decode=False)
    inner = getattr(feature, "feature", None)
    if inner is not None and isinstance(_undecoded(inner), ImageFeature):
        return type(feature)(_undecoded(inner))
    return None
