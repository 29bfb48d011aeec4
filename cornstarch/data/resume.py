"""Exact resume of training data: a train loader that knows how many batches the run has trained on.

Lightning restarts a train loader from its first batch unless the loader keeps state, and its own epoch counters
are off by one after some resumes (a checkpoint saved in ``on_train_epoch_end`` or at the end-of-epoch validation
gives the sampler the wrong epoch). So the position is counted here, in batches handed out over the whole run:
batch ``n`` of the run is batch ``n % L`` of epoch ``n // L`` (``L`` batches per epoch), whichever counters the
loop keeps. A resumed run therefore trains on exactly the batches the uninterrupted run did, mid-epoch included.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader

log = logging.getLogger(__name__)


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over a :class:`~cornstarch.data.sampling.RankShard`-style sampler (``set_epoch`` and
    ``skip``) that starts each pass where the run stands.

    Each pass (``iter``) computes its epoch and first batch from :attr:`batches_done`, tells the sampler (which
    drops the indices of the batches already trained on, without loading them), and counts every batch it hands
    out. Lightning asks for a batch of a sized loader only when it trains on it, so the count saved in a checkpoint
    is the number of batches trained on. :meth:`state_dict` / :meth:`load_state_dict` carry it (Lightning saves
    them with the loop; :class:`~cornstarch.data.MultimodalDataModule` saves them too, because Lightning drops loader
    states when ``configure_optimizers`` reads ``trainer.estimated_stepping_batches``).

    Args:
        *args, **kwargs: as for ``DataLoader``; ``sampler`` must have ``set_epoch(epoch)`` and a ``skip`` attribute
            (items of this rank to drop at the start of the next pass: samples, or whole batches when the sampler
            yields batches and ``batch_size=None``).
        epoch_length: batches per epoch as the trainer runs them (``limit_train_batches`` may take fewer than
            ``len(loader)``); asked at the start of each pass; default ``len(loader)``.

    >>> from cornstarch.data.sampling import EpochShuffleSampler
    >>> loader = ResumableLoader(list(range(6)), batch_size=2, sampler=EpochShuffleSampler(6))
    >>> run = [b.tolist() for _ in range(2) for b in loader]  # two epochs, uninterrupted
    >>> resumed = ResumableLoader(list(range(6)), batch_size=2, sampler=EpochShuffleSampler(6))
    >>> resumed.load_state_dict({"epoch": 0, "batch": 2, "epoch_length": 3})  # saved after 2 batches
    >>> [b.tolist() for b in resumed] + [b.tolist() for b in resumed] == run[2:]
    True
    """

    def __init__(self, *args: Any, epoch_length: Callable[[], int | None] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.batches_done = 0
        self.epoch_length = epoch_length
        self._restored: dict[str, int] | None = None  # a checkpoint's position, placed at the next pass

    def _epoch_length(self) -> int:
        length = self.epoch_length() if self.epoch_length is not None else None
        return max(1, min(int(length), len(self)) if length else len(self))

    def position(self) -> tuple[int, int]:
        """``(epoch, batch)``: where the next batch comes from."""
        self._place_restored()
        return divmod(self.batches_done, self._epoch_length())

    def __iter__(self) -> Iterator[Any]:
        epoch, batch = self.position()
        self.start_pass(epoch, batch)
        for _, item in zip(range(self._epoch_length() - batch), super().__iter__()):
            self.batches_done += 1  # before handing it out: a checkpoint taken while it trains counts it
            yield item

    def start_pass(self, epoch: int, batch: int) -> None:
        """Tell the sampler where the pass starts: ``epoch``, after its first ``batch`` batches."""
        self.sampler.set_epoch(epoch)
        self.sampler.skip = batch * (self.batch_size or 1)  # taken (and reset) by the sampler as its pass starts

    def state_dict(self) -> dict[str, int]:
        if self._restored is not None:
            return dict(self._restored)
        epoch, batch = self.position()
        return {"epoch": epoch, "batch": batch, "epoch_length": self._epoch_length()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at ``state`` (from :meth:`state_dict`); placed when the next pass starts, once the trainer knows
        its epoch length."""
        self._restored = dict(state)

    def _place_restored(self) -> None:
        if self._restored is None:
            return
        state, self._restored = self._restored, None
        epoch, batch, length = state["epoch"], state["batch"], self._epoch_length()
        if state["epoch_length"] != length:
            log.warning("The train data has %d batches per epoch, the checkpoint's had %d: epoch %d starts over "
                        "(its first %d batches were trained on with the old batches).", length,
                        state["epoch_length"], epoch, batch)
            batch = 0
        self.batches_done = epoch * length + batch
