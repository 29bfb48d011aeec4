"""The encoded path: encoding once at setup and padding Arrow rows per batch gives exactly the raw collator's
batches; large splits are announced; text-only rows encode without modality columns; Arrow columns read as the
collator's own."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from datasets import Dataset

from cornstarch.data import MultimodalCollator, MultimodalDataModule
from cornstarch.data.encoded import EncodedCollate, EncodedDataset, encoded_features
from cornstarch.data.packing import WithSupervisedPositions
from tests import tiny
from tests.data.test_collator import make, sample
from tests.data.test_datamodule import rows


def mixed_rows(n: int) -> dict:
    """Rows with 0-2 images and 0-1 audio clips, answers of varying length."""
    base = rows(n, skew=True)
    n_audio = [i % 2 for i in range(n)]
    for messages, k in zip(base["messages"], n_audio):
        messages[0]["content"] = "<audio> " * k + messages[0]["content"]
    base["audios"] = [tiny.waveforms(k, seed=i) for i, k in enumerate(n_audio)]
    return base


def assert_same_batches(loader_a, loader_b) -> None:
    for a, b in zip(loader_a, loader_b, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            same = torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key]
            assert same, key
            assert not isinstance(a[key], torch.Tensor) or a[key].dtype == b[key].dtype, key


@pytest.mark.parametrize("split", ["train", "val", "predict"])
def test_encoded_batches_equal_raw_collation(split):
    """Encoding once at setup and padding per batch gives exactly the batches of collating raw samples."""
    _, proc = make(audio=True)
    data = Dataset.from_dict(mixed_rows(14))
    kwargs = {split: data, "processor": proc, "batch_size": 4, "eval_batch_size": 5, "group_by_length": True,
              "sampling_rate": tiny.AUDIO_RATE}
    encoded, raw = MultimodalDataModule(**kwargs), MultimodalDataModule(preprocess=False, **kwargs)
    encoded.setup(), raw.setup()
    loader = getattr(encoded, f"{split}_dataloader")()
    if split == "train":
        assert encoded.lengths["train"] == raw.lengths["train"]
        order = list(loader.sampler)
        assert order == list(getattr(raw, f"{split}_dataloader")().sampler) and order != sorted(order)
    else:
        order = list(range(len(data)))
    collate = raw.collator(split, generate=split == "predict")
    if split == "train":  # train batches also carry the positions the model computes logits at
        collate = WithSupervisedPositions(collate)
    size = loader.batch_size
    direct = [collate([{**data[i], "__index__": i} for i in order[k:k + size]]) for k in range(0, len(order), size)]
    assert_same_batches(loader, direct)
    raw_loader = getattr(raw, f"{split}_dataloader")()
    if split == "train":  # a train loader's next pass is the next epoch: the raw one catches up by one pass
        list(raw_loader)
    assert_same_batches(loader, raw_loader)


def test_large_encoded_splits_are_announced(caplog, monkeypatch):
    import cornstarch.data.encoded as encoded

    _, proc = make()
    monkeypatch.setattr(encoded, "ENCODED_WARN_BYTES", 6 * 3 * 32 * 32 * 4)  # less than 6 images' pixels
    dm = MultimodalDataModule(train=Dataset.from_dict(rows(6)), processor=proc)
    with caplog.at_level(logging.WARNING):
        dm.setup()
    assert "train: the encoded samples will take about" in caplog.text and "preprocess=False" in caplog.text


def test_text_only_rows_encode_without_modality_columns():
    _, proc = make()
    data = Dataset.from_dict({"prompt": ["which digit ?", "what is this"], "answer": ["seven", "two three"]})
    dm = MultimodalDataModule(train=data, processor=proc, batch_size=2)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "supervised_positions"}
    assert int((batch["labels"] != -100).sum()) > 0


def test_arrow_rows_pad_as_the_collator_pads_its_own_columns():
    """An Arrow take of encoded rows, collated, equals the collator padding its Python columns of the same rows."""
    _, proc = make(audio=True)
    collator = MultimodalCollator(proc, with_prompts=True, sampling_rate=tiny.AUDIO_RATE)
    columns = collator.encode([sample(k, n_audio=k % 2, seed=k) for k in (0, 1, 2)])
    encoded_rows = EncodedDataset(Dataset.from_dict(columns, features=encoded_features(columns)))
    order = [2, 0, 1]
    python = collator.pad({name: [column[i] for i in order] for name, column in columns.items()})
    assert_same_batches([EncodedCollate(collator)(encoded_rows.__getitems__(order))], [python])


def test_cache_dir_keeps_the_encoded_split_on_disk_with_the_same_batches(tmp_path):
    """With cache_dir the encoded split is an Arrow file read memory-mapped (over-long samples dropped into a second
    file); the loader gives exactly the in-memory path's batches, with workers too."""
    from datasets.table import MemoryMappedTable

    _, proc = make()
    data = Dataset.from_dict(rows(40))
    kwargs = dict(processor=proc, batch_size=6, max_length=40, on_too_long="skip", seed=2)
    memory = MultimodalDataModule(train=data, **kwargs)
    disk = MultimodalDataModule(train=data, cache_dir=str(tmp_path / "cache"), num_workers=2, **kwargs)
    memory.setup("fit"), disk.setup("fit")
    assert isinstance(disk.encoded["train"].data, MemoryMappedTable)
    assert sorted(os.listdir(tmp_path / "cache")) == ["train-encoded.arrow", "train-kept.arrow"]
    assert disk.skipped["train"] == memory.skipped["train"] > 0
    for got, want in zip(disk.train_dataloader(), memory.train_dataloader(), strict=True):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got if k != "answers")
