"""Length-grouped sampling: batches of similar length, so less of each batch is padding."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class LengthGroupedSampler(Sampler[int]):
    """Shuffle, then sort by length within mega-batches of ``batch_size * group_size`` samples.

    Batches stay random across epochs (seeded by ``seed`` and :meth:`set_epoch`) while each holds samples of
    similar length. The longest mega-batch comes first, so an out-of-memory shows up at step one.

    Args:
        lengths: token length of each sample.
        batch_size: the loader's batch size.
        group_size: batches per mega-batch.
        seed: base seed of the shuffle.

    >>> sampler = LengthGroupedSampler([5, 50, 6, 49], batch_size=2, group_size=2, seed=0)
    >>> sorted(list(sampler)) == [0, 1, 2, 3]
    True
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, group_size: int = 50, seed: int = 0):
        self.lengths = torch.as_tensor(list(lengths))
        self.mega = max(1, batch_size * group_size)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator)
        groups = [g[torch.argsort(self.lengths[g], descending=True, stable=True)] for g in order.split(self.mega)]
        if groups:
            first = max(range(len(groups)), key=lambda i: int(self.lengths[groups[i][0]]))
            groups[0], groups[first] = groups[first], groups[0]
        return iter(torch.cat(groups).tolist() if groups else [])


class EpochShuffleSampler(Sampler[int]):
    """A random permutation per epoch, seeded by ``seed + epoch``: the same order after a resume.

    Lightning calls :meth:`set_epoch` at each epoch start, so a run resumed from an epoch-boundary checkpoint sees
    exactly the batches the uninterrupted run saw (mid-epoch resume is not exact yet: the loader keeps no state).

    >>> sampler = EpochShuffleSampler(4, seed=0)
    >>> first = list(sampler); sampler.set_epoch(1); second = list(sampler); sampler.set_epoch(0)
    >>> list(sampler) == first and sorted(second) == [0, 1, 2, 3]
    True
    """

    def __init__(self, size: int, seed: int = 0):
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())
