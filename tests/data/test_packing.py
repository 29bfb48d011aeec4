"""Packing: samples concatenated into rows give each sample the loss it has alone."""

from __future__ import annotations

import pytest
import torch

from cornstarch.data import DatasetSpec, MultimodalDataModule
from cornstarch.data.packing import PackedBatchSampler, first_fit_decreasing, pack_batch
from cornstarch.models.multimodal_language_model import ModalEncoderModule, MultimodalModel
from cornstarch.models.multimodal_language_model.supervised_loss import (
    next_token_targets,
    per_sample_loss,
    supervised_positions,
)
from tests import tiny

TOKEN = tiny.VOCAB + 1  # outside the LM vocabulary: the model must never look it up
N = tiny.VISION_TOKENS["clip"]
ITEMS = [1, 0, 2, 1, 0]  # images per sample, in order


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    mllm = MultimodalModel({"vision": ModalEncoderModule(tiny.vision_model("clip"))}, tiny.llm("llama"))
    mllm.set_modality_token_ids({"vision": TOKEN})
    return mllm.train()


def padded_batch():
    ids, mask = tiny.batch_with_placeholders([[(TOKEN, N)] * c for c in ITEMS], seq_len=64)
    labels = ids.masked_fill((mask == 0) | (ids == TOKEN), -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": tiny.pixels(sum(ITEMS))}


def alone_losses(model, batch) -> torch.Tensor:
    """Each sample run by itself, unpadded."""
    losses, first = [], 0
    for i, n_items in enumerate(ITEMS):
        n = int(batch["attention_mask"][i].sum())
        images = batch["pixel_values"][first:first + n_items]
        first += n_items
        kwargs = {"pixel_values": images} if n_items else {}
        losses.append(model(input_ids=batch["input_ids"][i:i + 1, :n], labels=batch["labels"][i:i + 1, :n],
                            attention_mask=batch["attention_mask"][i:i + 1, :n], **kwargs).loss)
    return torch.stack(losses)


@torch.no_grad()
def test_packed_rows_give_each_sample_its_loss_alone(model):
    batch = padded_batch()
    packed, sample_of_token = pack_batch(batch, capacity=96)
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] < len(ITEMS)  # really packed
    assert (packed["input_ids"] != 0).sum() == batch["attention_mask"].sum()  # every token kept, once
    out = model(**packed)
    targets = next_token_targets(packed["labels"], out.logits_positions)  # placeholders are -100 already
    owners = next_token_targets(sample_of_token, out.logits_positions)
    got = per_sample_loss(out.logits, targets, owners.clamp(min=0), len(ITEMS))
    torch.testing.assert_close(got, alone_losses(model, batch), atol=1e-5, rtol=1e-5)


def test_packing_keeps_order_and_restarts_positions():
    batch = padded_batch()
    packed, sample_of_token = pack_batch(batch, capacity=96)
    lengths = batch["attention_mask"].sum(1)
    owners = sample_of_token[sample_of_token >= 0]
    assert torch.equal(owners, torch.repeat_interleave(torch.arange(len(ITEMS)), lengths))  # samples in order
    for i in range(len(ITEMS)):
        assert torch.equal(packed["position_ids"][sample_of_token == i], torch.arange(int(lengths[i])))
    assert torch.equal(packed["pixel_values"], batch["pixel_values"])


def test_sample_longer_than_capacity_is_named():
    batch = padded_batch()
    lengths = batch["attention_mask"].sum(1)
    capacity = int(lengths[0])  # sample 0 fits exactly; the first longer one is named
    first_too_long = int((lengths > capacity).nonzero()[0])
    with pytest.raises(ValueError, match=f"Sample {first_too_long} has {int(lengths[first_too_long])} tokens"):
        pack_batch(batch, capacity=capacity)


def test_left_padding_is_refused():
    ids, mask = tiny.batch_with_placeholders([[(TOKEN, N)], []], seq_len=32, pad_left=True)
    with pytest.raises(ValueError, match="right-padded"):
        pack_batch({"input_ids": ids, "attention_mask": mask, "labels": ids}, capacity=64)


def test_packed_batch_sampler_covers_every_sample_once_per_epoch():
    lengths = [int(n) for n in torch.randint(5, 60, (50,), generator=torch.Generator().manual_seed(0))]
    sampler = PackedBatchSampler(lengths, capacity=64, rows_per_batch=3, seed=0)
    epochs = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert sorted(i for b in batches for i in b) == list(range(50))
        epochs.append(batches)
    assert epochs[0] != epochs[1]  # reshuffled rows and partners
    rows = first_fit_decreasing(lengths, 64)
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert sum(lengths) / (len(rows) * 64) > 0.9  # well packed


def test_data_module_packs_train_batches_and_lightning_trains_on_them(tmp_path):
    from tests.lit.test_module import DATASET, make_module, make_trainer

    data = MultimodalDataModule(train=DatasetSpec(DATASET, split="train", kwargs={"image_size": 8, "n": 24}),
                                batch_size=2, max_length=100, pack=True)  # digits samples: ~33 tokens
    module = make_module()
    data.processor = module.processor
    data.setup()
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == (2, 100) and "attention_mask" not in batch
    assert batch["pixel_values"].shape[0] > 2  # several samples (one image each) per row
    assert torch.equal(batch["supervised_positions"], supervised_positions(batch["labels"]))
    trainer = make_trainer(tmp_path, max_steps=3)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 3


def test_pack_needs_max_length():
    with pytest.raises(ValueError, match="pack=True needs max_length"):
        MultimodalDataModule(pack=True)


def test_ranks_share_the_rows_of_one_process():
    lengths = [int(n) for n in torch.randint(5, 60, (40,), generator=torch.Generator().manual_seed(1))]
    one = list(PackedBatchSampler(lengths, capacity=64, rows_per_batch=4, seed=3))
    ranks = [list(PackedBatchSampler(lengths, capacity=64, rows_per_batch=2, seed=3, num_replicas=2, rank=r))
             for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(one)
    for step, batch in enumerate(one[:-1]):  # the last global step may wrap around
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(batch)
