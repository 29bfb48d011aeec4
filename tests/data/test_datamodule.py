"""MultimodalDataModule: in-memory samples feed the model; seeded shuffle; grouping; skipping; bad samples named at
setup; clear errors for a missing processor or split."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from datasets import Dataset

from cornstarch.data import MultimodalDataModule, SampleError
from tests import tiny
from tests.data.test_collator import make


def rows(n: int, seed: int = 0, skew: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    answers = [" ".join(rng.choice(tiny.WORDS[4:20], size=int(rng.integers(1, 40 if skew and i % 4 == 0 else 3))))
               for i in range(n)]
    n_images = [i % 3 for i in range(n)]
    return {
        "messages": [[{"role": "user", "content": " ".join(["<image>"] * k) + " which digit ?"},
                      {"role": "assistant", "content": a}] for k, a in zip(n_images, answers)],
        "images": [tiny.pil_images(k, seed=i) for i, k in enumerate(n_images)],
    }


def test_in_memory_dataset_batches_feed_the_model():
    mllm, proc = make()
    dm = MultimodalDataModule(train=Dataset.from_dict(rows(6)), val=Dataset.from_dict(rows(3, 1)), processor=proc,
                              batch_size=3)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 2
    val = list(dm.val_dataloader())
    assert all({"answers", "prompt_input_ids", "prompt_attention_mask"} <= set(b) for b in val)
    for batch in batches + val:
        inputs = {k: v for k, v in batch.items() if k not in ("answers", "prompt_input_ids", "prompt_attention_mask")}
        assert torch.isfinite(mllm(**inputs).loss)


def test_bad_samples_are_named_at_setup():
    _, proc = make()
    data = rows(6)
    data["images"][4] = []  # its text still has a placeholder (4 % 3 = 1)
    dm = MultimodalDataModule(train=Dataset.from_dict(data), processor=proc)
    with pytest.raises(SampleError, match=r"Sample 4, field 'images': 1 <image> placeholder\(s\) .* but 0 item"):
        dm.setup()
    dm = MultimodalDataModule(train=Dataset.from_dict(rows(6)), processor=proc, max_length=40)
    with pytest.raises(SampleError, match=r"Sample 2, field 'messages': \d+ tokens .* max_length=40"):
        dm.setup()


def order(seed: int) -> list[int]:
    _, proc = make()
    dm = MultimodalDataModule(train=Dataset.from_dict(rows(8)), processor=proc, batch_size=8, seed=seed)
    loader = dm.train_dataloader()
    ids = next(iter(loader))["input_ids"]
    return [hash(tuple(r.tolist())) for r in ids]


def test_seeded_shuffle_is_reproducible():
    assert order(3) == order(3)
    assert order(3) != order(4)


def real_fraction(dm) -> float:
    real = total = 0
    for batch in dm.train_dataloader():
        real += int(batch["attention_mask"].sum())
        total += batch["attention_mask"].numel()
    return real / total


@pytest.mark.parametrize("preprocess", [True, False], ids=["encoded", "raw"])
def test_group_by_length_cuts_padding(preprocess):
    _, proc = make()
    data = Dataset.from_dict(rows(48, skew=True))
    plain = MultimodalDataModule(train=data, processor=proc, batch_size=4, preprocess=preprocess)
    grouped = MultimodalDataModule(train=data, processor=proc, batch_size=4, group_by_length=True,
                                   preprocess=preprocess)
    plain.setup(), grouped.setup()
    collate = grouped.collator("train")
    exact = [len(collate([{**data[i], "__index__": i}])["input_ids"][0]) for i in range(len(data))]
    assert grouped.lengths["train"] == exact, "estimated lengths are exact for fixed-size encoders"
    assert real_fraction(grouped) > real_fraction(plain) + 0.1


@pytest.mark.parametrize("preprocess", [True, False], ids=["encoded", "raw"])
def test_too_long_samples_are_skipped_at_setup_and_logged(caplog, preprocess):
    _, proc = make()
    data = Dataset.from_dict(rows(9))  # 0, 1 or 2 images: 2 images exceed 40 tokens
    dm = MultimodalDataModule(train=data, processor=proc, batch_size=4, max_length=40, on_too_long="skip",
                              preprocess=preprocess)
    with caplog.at_level(logging.WARNING):
        dm.setup()
    assert dm.skipped["train"] == 3 and len(dm.datasets["train"]) == 6
    assert "skipped 3 of 9 samples longer than max_length=40" in caplog.text
    for batch in dm.train_dataloader():
        assert batch["input_ids"].shape[1] <= 40


def test_missing_processor_and_missing_split_are_clear():
    dm = MultimodalDataModule(train=Dataset.from_dict(rows(2)))
    with pytest.raises(ValueError, match="has no processor"):
        dm.train_dataloader()
    _, proc = make()
    dm = MultimodalDataModule(train=Dataset.from_dict(rows(2)), processor=proc)
    with pytest.raises(ValueError, match=r"No val data: pass val=DatasetSpec"):
        dm.val_dataloader()
