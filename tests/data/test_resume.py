"""ResumableLoader: a run resumed at any batch, mid-epoch included, trains on the batches the uninterrupted run did
(plain shuffle, length grouping, packed rows, two ranks, workers, Lightning's limit_train_batches); the data
module saves and restores the position."""

from __future__ import annotations

import logging
from itertools import islice

import pytest
import torch
from datasets import Dataset

from cornstarch.data import MultimodalDataModule
from cornstarch.data.packing import BatchIndexed, PackedBatchSampler
from cornstarch.data.resume import ResumableLoader
from cornstarch.data.sampling import EpochShuffleSampler, LengthGroupedSampler
from tests.data.test_collator import make
from tests.data.test_datamodule import rows

N = 11  # samples: with batch 3 the last batch of an epoch is short
LENGTHS = [(7 * i) % 13 + 1 for i in range(N)]


class Items(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> int:
        return i

    def __getitems__(self, indices: list[int]) -> list[int]:
        return list(indices)


def loader(kind: str, rank: int = 0, ranks: int = 1, **kwargs) -> ResumableLoader:
    if kind == "packed":
        sampler = PackedBatchSampler(LENGTHS, capacity=14, rows_per_batch=2, num_replicas=ranks, rank=rank)
        return ResumableLoader(BatchIndexed(Items()), sampler=sampler, batch_size=None, collate_fn=list, **kwargs)
    if kind == "grouped":
        sampler = LengthGroupedSampler(LENGTHS, batch_size=3, group_size=1, num_replicas=ranks, rank=rank)
    else:
        sampler = EpochShuffleSampler(N, num_replicas=ranks, rank=rank)
    return ResumableLoader(Items(), batch_size=3, sampler=sampler, collate_fn=list, **kwargs)


def run(data: ResumableLoader, epochs: int) -> list[list[int]]:
    return [batch for _ in range(epochs) for batch in data]


@pytest.mark.parametrize("kind", ["plain", "grouped", "packed"])
@pytest.mark.parametrize("ranks", [1, 2])
def test_resume_at_every_batch_gives_the_uninterrupted_batches(kind, ranks):
    for rank in range(ranks):
        whole = run(loader(kind, rank, ranks), 3)
        epoch = len(loader(kind, rank, ranks))
        assert len(whole) == 3 * epoch and whole[:epoch] != whole[epoch:2 * epoch], "epochs are reshuffled"
        for stop in range(2 * epoch + 1):
            first = loader(kind, rank, ranks)
            seen = list(islice((b for _ in range(3) for b in first), stop))  # interrupted after `stop` batches
            state = first.state_dict()
            assert state == {"epoch": stop // epoch, "batch": stop % epoch, "epoch_length": epoch}
            again = loader(kind, rank, ranks)
            again.load_state_dict(state)
            rest = [b for _ in range(3 - stop // epoch) for b in again]
            assert seen + rest == whole, (kind, rank, stop)


@pytest.mark.parametrize("epoch_length", [None, 3])
def test_persistent_workers_resume_exactly(epoch_length):
    """Workers take their indices when the pass starts; a pass cut short (limit) leaves them mid-epoch."""
    length = (lambda: epoch_length) if epoch_length else None
    whole = run(loader("plain", epoch_length=length), 3)
    again = loader("plain", num_workers=2, persistent_workers=True, epoch_length=length)
    again.load_state_dict({"epoch": 0, "batch": 2, "epoch_length": epoch_length or 4})
    assert run(again, 3) == whole[2:]


def test_epoch_length_follows_the_trainer_limit():
    """With limit_train_batches an epoch is the first few batches of its shuffle; a resume keeps that."""
    short = loader("plain", epoch_length=lambda: 2)
    whole = run(short, 3)
    full = run(loader("plain"), 3)
    assert len(whole) == 6 and whole[2:4] == full[4:6], "epoch 1 starts at its own first batch"
    again = loader("plain", epoch_length=lambda: 2)
    again.load_state_dict({"epoch": 1, "batch": 1, "epoch_length": 2})
    assert run(again, 2) == whole[3:]


def test_a_changed_epoch_length_restarts_the_epoch_and_says_so(caplog):
    again = loader("plain")
    again.load_state_dict({"epoch": 1, "batch": 2, "epoch_length": 5})
    with caplog.at_level(logging.WARNING, logger="cornstarch.data.resume"):
        assert run(again, 1) == run(loader("plain"), 2)[4:]
    assert "4 batches per epoch, the checkpoint's had 5: epoch 1 starts over" in caplog.text


def test_data_module_saves_and_restores_the_train_position():
    _, proc = make()
    data = Dataset.from_dict(rows(10))

    def module() -> MultimodalDataModule:
        dm = MultimodalDataModule(train=data, processor=proc, batch_size=4, seed=1)
        dm.setup("fit")
        return dm

    first = module()
    assert first.state_dict() == {}, "no position before a train loader exists"
    batches = iter(first.train_dataloader())
    next(batches)
    state = first.state_dict()
    assert state == {"train_position": {"epoch": 0, "batch": 1, "epoch_length": 3}}
    expected = [b["input_ids"] for b in batches]

    resumed = module()
    resumed.load_state_dict(state)  # Lightning restores the data module before it asks for loaders
    got = [b["input_ids"] for b in resumed.train_dataloader()]
    assert len(got) == len(expected) == 2 and all(torch.equal(a, b) for a, b in zip(got, expected))

    late = module()
    built = late.train_dataloader()  # strategies restoring after setup: the loader exists already
    late.load_state_dict(state)
    assert [b["input_ids"].shape for b in built] == [t.shape for t in expected]
    late.setup("fit")
    assert late.state_dict() == {}, "a new fit starts from the first batch"
