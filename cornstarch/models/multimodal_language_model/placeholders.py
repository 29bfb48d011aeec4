"""Expand each modality placeholder token into as many copies as its item yields features (on the CPU)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ...batch import IGNORE_INDEX


def assign_items(placeholders: Sequence[int], counts: Sequence[int], key: str, token: str) -> list[list[int]]:
    """Split a batch's flat per-item feature counts into per-sample lists, by placeholders per sample.

    Args:
        placeholders: number of ``token`` placeholders in each sample.
        counts: features per item, items in sample order.
        key: the modality (for messages).
        token: the placeholder text (for messages).

    Returns:
        Per sample, the feature counts of its items.

    Raises:
        ValueError: naming the sample where placeholders and items stop matching.

    >>> assign_items([1, 0, 2], [16, 16, 16], "vision", "<image>")
    [[16], [], [16, 16]]
    """
    total = sum(placeholders)
    if total < len(counts):
        raise ValueError(
            f"Fewer {token} placeholders than {key} items: the text has {total} (per sample: {list(placeholders)}) "
            f"but {len(counts)} {key} item(s) were given."
        )
    result, start = [], 0
    for sample, n in enumerate(placeholders):
        if start + n > len(counts):
            raise ValueError(
                f"Sample {sample}: {n} {token} placeholder(s) but only {len(counts) - start} {key} item(s) left "
                f"({len(counts)} given for the batch)."
            )
        result.append(list(counts[start : start + n]))
        start += n
    return result


def count_placeholders(ids: Sequence[int], token_id: int) -> int:
    return int(np.count_nonzero(np.asarray(ids) == token_id))


def expand_placeholders(
    ids: Sequence[int],
    token_ids: Mapping[str, int],
    counts: Mapping[str, Sequence[int]],
    labels: Sequence[int] | None = None,
) -> tuple[list[int], list[int] | None]:
    """Repeat each placeholder id by its item's feature count; labels there become -100.

    Args:
        ids: one sample's token ids, one placeholder per item.
        token_ids: modality → placeholder id.
        counts: modality → feature count of each of this sample's items, in order.
        labels: optional labels aligned with ``ids``.

    Returns:
        ``(expanded ids, expanded labels or None)``.

    Raises:
        ValueError: if a modality's placeholders and counts differ in number.

    >>> expand_placeholders([1, 9, 2, 9], {"vision": 9}, {"vision": [2, 3]})
    ([1, 9, 9, 2, 9, 9, 9], None)
    """
    arr = np.asarray(ids, dtype=np.int64)
    repeats = np.ones(len(arr), dtype=np.int64)
    placeholder = np.zeros(len(arr), dtype=bool)
    for key, token_id in token_ids.items():
        positions = np.flatnonzero(arr == token_id)
        item_counts = list(counts.get(key, ()))
        if len(positions) != len(item_counts):
            raise ValueError(f"{len(positions)} {key} placeholder(s) but {len(item_counts)} {key} item(s).")
        repeats[positions] = item_counts
        placeholder[positions] = True
    expanded = np.repeat(arr, repeats).tolist()
    if labels is None:
        return expanded, None
    lab = np.where(placeholder, IGNORE_INDEX, np.asarray(labels, dtype=np.int64))
    return expanded, np.repeat(lab, repeats).tolist()
