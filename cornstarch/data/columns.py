"""The columns a batch is made from, and padding them into tensors.

:meth:`~cornstarch.data.collator.MultimodalCollator.encode` turns samples into columns: token lists, answer strings
and per-sample ``[items, ...]`` processor outputs; :meth:`~cornstarch.data.collator.MultimodalCollator.pad` reads
them through :class:`EncodedColumns` (Python lists) or :class:`cornstarch.data.encoded.ArrowColumns` (Arrow) and
pads and stacks them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..batch import EVAL_KEYS
from ..models.dynamic_resolution import PADDED_FAMILIES, cropped_images, item_rows

ANSWERS, PROMPT_INPUT_IDS, PROMPT_ATTENTION_MASK = EVAL_KEYS  # the eval keys by name

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


def padded_family(counter: Any) -> bool:
    """Whether a modality's processor pads each call's images to the largest (Pixtral): they are then stored per
    sample without the padding (:func:`~cornstarch.models.dynamic_resolution.cropped_images`)."""
    return getattr(getattr(counter, "config", None), "model_type", None) in PADDED_FAMILIES


def per_sample(features: dict[str, dict], counts: dict[str, list[list[int]]],
                cropped: set[str] = frozenset()) -> tuple[dict[str, list], dict]:
    """Processor outputs split per sample (``[items, ...]`` arrays, or ``[rows, ...]`` for outputs with several rows
    per item, see :func:`~cornstarch.models.dynamic_resolution.item_rows`); other outputs, kept whole."""
    per_item: dict[str, list[np.ndarray]] = {}
    shared: dict[str, Any] = {}
    for key, tensors in features.items():
        splits = np.cumsum([0] + [len(c) for c in counts[key]])
        flat = item_rows(tensors)  # outputs with each item's patches end to end (Qwen2-VL): rows per item
        for name, value in tensors.items():
            if name in per_item or name in shared:
                raise ValueError(f"Two modality processors output {name!r}; the batch can hold only one.")
            if name in flat:
                array, bounds = value.numpy(), np.cumsum([0, *flat[name]])[splits]
                per_item[name] = [array[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
            elif key in cropped and name == "pixel_values":  # [Σ C·h·w] per sample, padded again by pad()
                crops = cropped_images(tensors)
                per_item[name] = [np.concatenate(crops[a:b] or [np.zeros(0, crops[0].dtype)])
                                  for a, b in zip(splits[:-1], splits[1:])]
            elif isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == splits[-1]:
                array = value.numpy()
                per_item[name] = [array[a:b] for a, b in zip(splits[:-1], splits[1:])]
            else:
                shared[name] = value
    return per_item, shared


def pad_tokens(flat: np.ndarray, lengths: np.ndarray, value: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
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
