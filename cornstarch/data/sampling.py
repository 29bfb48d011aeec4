"""Length-grouped sampling: batches of similar length, so less of each batch is padding."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DistributedSampler


class RankShard(DistributedSampler):
    """Base of the samplers below: one global order per epoch, dealt out to ``num_replicas`` ranks.

    Rank ``r`` takes positions ``r, r + n, r + 2n, …`` of the order (padded by wrapping around to a multiple of
    ``n``, so every rank has the same number of batches). With a per-rank batch ``b``, step ``k`` of all ranks
    together covers positions ``k·n·b … (k+1)·n·b − 1``: the samples a single process with batch ``n·b`` sees at
    step ``k``. Being a ``DistributedSampler``, Lightning uses it as is instead of wrapping it in its own.

    ``skip``: items of this rank that the next pass leaves out at its start, once (set by
    :class:`~cornstarch.data.resume.ResumableLoader` to resume mid-epoch).
    """

    skip: int = 0

    def __init__(self, size: int, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}.")
        self.size = size
        self.seed = seed
        self.epoch = 0
        self.num_replicas = num_replicas
        self.rank = rank

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.size // self.num_replicas)  # ceil

    def order(self) -> torch.Tensor:
        """The global order of this epoch (all ranks)."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        order = self.order()
        if self.num_replicas > 1:
            total = len(self) * self.num_replicas
            if total > len(order):
                order = torch.cat([order, order[: total - len(order)]]) if len(order) else order
            order = order[self.rank::self.num_replicas]
        return iter(order[skip:].tolist())


class LengthGroupedSampler(RankShard):
    """Shuffle, then sort by length within mega-batches of ``batch_size * group_size`` samples.

    Batches stay random across epochs (seeded by ``seed`` and :meth:`set_epoch`) while each holds samples of
    similar length. The longest mega-batch comes first, so an out-of-memory shows up at step one.

    Args:
        lengths: token length of each sample.
        batch_size: the loader's batch size.
        group_size: batches per mega-batch.
        seed: base seed of the shuffle.
        num_replicas, rank: distributed ranks (see ``RankShard``); the defaults mean one process.

    >>> sampler = LengthGroupedSampler([5, 50, 6, 49], batch_size=2, group_size=2, seed=0)
    >>> sorted(list(sampler)) == [0, 1, 2, 3]
    True
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, group_size: int = 50, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0):
        super().__init__(len(lengths), seed, num_replicas, rank)
        self.lengths = torch.as_tensor(list(lengths))
        self.mega = max(1, batch_size * num_replicas * group_size)  # global batches

    def order(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator)
        groups = [g[torch.argsort(self.lengths[g], descending=True, stable=True)] for g in order.split(self.mega)]
        if groups:
            first = max(range(len(groups)), key=lambda i: int(self.lengths[groups[i][0]]))
            groups[0], groups[first] = groups[first], groups[0]
        return torch.cat(groups) if groups else order


class EpochShuffleSampler(RankShard):
    """A random permutation per epoch, seeded by ``seed + epoch``: the same order after a resume.

    A run resumed from any checkpoint sees exactly the batches the uninterrupted run saw when the loader is a
    :class:`~cornstarch.data.resume.ResumableLoader` (as :class:`~cornstarch.data.MultimodalDataModule` builds it).

    >>> sampler = EpochShuffleSampler(4, seed=0)
    >>> first = list(sampler); sampler.set_epoch(1); second = list(sampler); sampler.set_epoch(0)
    >>> list(sampler) == first and sorted(second) == [0, 1, 2, 3]
    True
    """

    def order(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.size, generator=generator)
