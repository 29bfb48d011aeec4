"""Packing: several samples in one row, each attending only to itself.

A right-padded batch of samples with skewed lengths is mostly padding. ``pack_batch`` concatenates its samples, in
order, into rows of at most ``capacity`` tokens, with ``position_ids`` restarting at 0 for every sample and no
``attention_mask``: transformers then builds a block-diagonal causal mask from the position ids (its packed-sequence
format), so each sample's logits and loss equal those of the sample run alone. Samples keep their order, so the
modality tensors of the batch (images, audio, item after item) still match the placeholders.

>>> batch = {"input_ids": torch.tensor([[5, 6, 7], [8, 9, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
...          "labels": torch.tensor([[-100, 6, 7], [8, 9, -100]])}
>>> packed, sample_of_token = pack_batch(batch, capacity=5)
>>> packed["input_ids"].tolist(), packed["position_ids"].tolist(), sample_of_token.tolist()
([[5, 6, 7, 8, 9]], [[0, 1, 2, 0, 1]], [[0, 0, 0, 1, 1]])
>>> packed["labels"].tolist()  # token 8 starts sample 1: nothing before it in that sample predicts it
[[-100, 6, 7, -100, 9]]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..batch import IGNORE_INDEX, POSITION_IDS, SUPERVISED_POSITIONS, TEXT_KEYS, supervised_positions
from .sampling import RankShard


def next_fit_rows(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Row of each sample when samples are laid out in order, a new row starting when the next does not fit.

    Raises:
        ValueError: naming the sample, if one is longer than ``capacity``.
    """
    too_long = np.flatnonzero(lengths > capacity)
    if too_long.size:
        i = int(too_long[0])
        raise ValueError(f"Sample {i} has {int(lengths[i])} tokens, more than the packing capacity {capacity}.")
    rows = np.zeros(len(lengths), dtype=np.int64)
    row, used = 0, 0
    for i, n in enumerate(lengths.tolist()):  # data layer, on the CPU: a few samples per batch
        if used + n > capacity:
            row, used = row + 1, 0
        rows[i], used = row, used + n
    return rows


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of sample indices, each summing to at most ``capacity`` tokens, longest samples placed first.

    Laying the samples out bin after bin and packing them with :func:`pack_batch` reproduces these rows.

    >>> first_fit_decreasing([5, 2, 4, 3, 1], capacity=6)
    [[0, 4], [2, 1], [3]]

    Raises:
        ValueError: naming the sample, if one is longer than ``capacity``.
    """
    lengths = np.asarray(lengths)
    next_fit_rows(lengths, capacity)  # raises for a sample that cannot fit anywhere
    bins: list[list[int]] = []
    free = np.empty(0, dtype=np.int64)  # room left in each bin
    for i in np.argsort(-lengths, kind="stable").tolist():  # data layer, on the CPU
        fits = np.flatnonzero(free >= lengths[i])
        if fits.size:
            bins[fits[0]].append(i)
            free[fits[0]] -= lengths[i]
        else:
            bins.append([i])
            free = np.append(free, capacity - lengths[i])
    return bins


def pack_batch(batch: Mapping[str, Any], capacity: int | None = None,
               pad_token_id: int = 0) -> tuple[dict[str, Any], torch.Tensor]:
    """Pack a right-padded collated batch into rows of at most ``capacity`` tokens.

    Args:
        batch: ``input_ids``, ``attention_mask``, ``labels`` ``[batch, seq]`` (right padding) and any modality
            tensors, which pass through unchanged.
        capacity: tokens per row (default: the batch's ``seq``).
        pad_token_id: id filling each row's tail.

    Returns:
        The packed batch (``input_ids``, ``labels``, ``position_ids`` ``[rows, capacity]``, no ``attention_mask``,
        other entries as given), and ``sample_of_token`` ``[rows, capacity]``: the sample each token comes from
        (-1 for padding).

    Raises:
        ValueError: if the batch is left-padded or a sample is longer than ``capacity``.
    """
    mask = batch["attention_mask"].bool()  # [batch, seq]
    lengths = mask.sum(1).numpy()  # [batch]
    if not bool((mask == (torch.arange(mask.shape[1]) < torch.as_tensor(lengths)[:, None])).all()):
        raise ValueError("pack_batch needs right-padded samples (padding_side='right').")
    capacity = capacity or mask.shape[1]
    rows = next_fit_rows(lengths, capacity)  # [batch], non-decreasing
    begins = np.cumsum(lengths) - lengths  # each sample's offset in the concatenation of all samples
    starts = begins - begins[np.searchsorted(rows, rows)]  # ... and in its row (minus its row's first sample's)
    n_rows = int(rows.max()) + 1 if len(rows) else 0
    # every real token: (sample, column in sample) → (row, start + column)
    sample, column = mask.nonzero(as_tuple=True)  # [n_tokens] each, sample-major
    row_of = torch.as_tensor(rows)[sample]
    col_of = torch.as_tensor(starts)[sample] + column
    packed = {k: v for k, v in batch.items() if k not in TEXT_KEYS}
    packed["input_ids"] = torch.full((n_rows, capacity), pad_token_id, dtype=batch["input_ids"].dtype)
    packed["labels"] = torch.full((n_rows, capacity), IGNORE_INDEX, dtype=batch["labels"].dtype)
    packed["input_ids"][row_of, col_of] = batch["input_ids"][sample, column]
    packed["labels"][row_of, col_of] = batch["labels"][sample, column]
    first = column == 0  # a sample's first label is never predicted alone; packed, it must not be either
    packed["labels"][row_of[first], col_of[first]] = IGNORE_INDEX
    sample_of_token = torch.full((n_rows, capacity), -1, dtype=torch.long)
    sample_of_token[row_of, col_of] = sample
    # positions restart for every sample; each row's padding tail is one more "sample" starting at 0
    position_ids = torch.arange(capacity).repeat(n_rows, 1)  # [rows, capacity]
    used = torch.zeros(n_rows, dtype=torch.long).index_add_(0, torch.as_tensor(rows), torch.as_tensor(lengths))
    position_ids[row_of, col_of] = column
    tail = torch.arange(capacity) >= used[:, None]  # [rows, capacity]
    position_ids = torch.where(tail, position_ids - used[:, None], position_ids)
    packed[POSITION_IDS] = position_ids
    return packed, sample_of_token


class PackedBatchSampler(RankShard):
    """Batches of whole rows: the samples of ``rows_per_batch`` packed rows, row after row.

    Rows come from :func:`first_fit_decreasing` over the epoch's shuffle (seed + epoch), so equal-length samples
    change partners between epochs, and the rows are shuffled; the number of rows depends only on the lengths, so
    every epoch has the same number of batches. Collate a batch, then :func:`pack_batch` it with the same capacity.

    With ``num_replicas`` ranks, step ``k`` of rank ``r`` takes rows ``r·b … (r+1)·b − 1`` of the ``n·b`` rows a
    single process with ``rows_per_batch = n·b`` would take at step ``k`` (rows wrap around so that every rank has
    the same number of batches). It yields lists of indices: use it as a ``DataLoader``'s ``sampler`` with
    ``batch_size=None`` over a dataset indexed by lists (:class:`BatchIndexed`); being a ``DistributedSampler``,
    Lightning keeps it as it is.

    Args:
        lengths: token length of each sample.
        capacity: tokens per row.
        rows_per_batch: rows per batch of each rank.
        seed: base seed.
        num_replicas, rank: the data-parallel ranks (default: one process).

    >>> sampler = PackedBatchSampler([5, 2, 4, 3, 1], capacity=6, rows_per_batch=2)
    >>> len(sampler), sorted(i for batch in sampler for i in batch)
    (2, [0, 1, 2, 3, 4])
    """

    def __init__(self, lengths: Sequence[int], capacity: int, rows_per_batch: int, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0):
        super().__init__(len(lengths), seed, num_replicas, rank)
        self.lengths = np.asarray(lengths)
        self.capacity = capacity
        self.rows_per_batch = rows_per_batch
        self._rows = len(first_fit_decreasing(self.lengths, capacity))

    def __len__(self) -> int:
        return -(-self._rows // (self.rows_per_batch * self.num_replicas))

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0  # batches to leave out (see RankShard)
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).numpy()
        rows = [order[row].tolist() for row in first_fit_decreasing(self.lengths[order], self.capacity)]
        rows = [rows[r] for r in torch.randperm(len(rows), generator=generator).tolist()]
        per_step = self.rows_per_batch * self.num_replicas
        if self.num_replicas > 1:  # every rank the same number of batches: wrap around
            rows = [rows[i % len(rows)] for i in range(len(self) * per_step)]
        for start in range(skip * per_step, len(rows), per_step):
            mine = rows[start + self.rank * self.rows_per_batch:start + (self.rank + 1) * self.rows_per_batch]
            yield [i for row in mine for i in row]


class BatchIndexed(torch.utils.data.Dataset):
    """A dataset indexed by lists of indices (``dataset.__getitems__``), for samplers that yield whole batches."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: list[int]) -> Any:
        return self.dataset.__getitems__(indices)


class PackingCollate:
    """``collate`` (right padding), then :func:`pack_batch` into rows of ``capacity`` tokens.

    Returns the packed batch only (no ``sample_of_token``): ``input_ids``, ``labels``, ``position_ids`` and the
    modality tensors, ready for ``MultimodalModel.forward``.
    """

    def __init__(self, collate: Callable[[Any], dict[str, Any]], capacity: int, pad_token_id: int = 0):
        self.collate, self.capacity, self.pad_token_id = collate, capacity, pad_token_id

    def __call__(self, samples: Any) -> dict[str, Any]:
        return pack_batch(self.collate(samples), self.capacity, self.pad_token_id)[0]


class WithSupervisedPositions:
    """A train collate plus ``supervised_positions`` (computed here, on the CPU), so that
    ``MultimodalModel.forward`` computes logits only where supervised without waiting for the device."""

    def __init__(self, collate: Callable[[Any], dict[str, Any]]):
        self.collate = collate

    def __call__(self, samples: Any) -> dict[str, Any]:
        batch = self.collate(samples)
        batch[SUPERVISED_POSITIONS] = supervised_positions(batch["labels"])
        return batch
