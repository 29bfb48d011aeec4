"""Logits only where supervised: positions, targets, and the same loss as a full-logits forward in every mode."""

from __future__ import annotations

import pytest
import torch

from cornstarch.models.multimodal_language_model import ModalEncoderModule, MultimodalModel
from cornstarch.models.multimodal_language_model.supervised_loss import (
    at_positions,
    next_token_targets,
    supervised_positions,
)
from tests import tiny

TOKEN = tiny.VOCAB + 3
N = tiny.VISION_TOKENS["clip"]


def test_positions_and_targets_line_up():
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, -100, -100]])
    positions = supervised_positions(labels)
    assert positions.tolist() == [1, 2, 4]  # row 0 columns 1, 2; row 1 column 0 (flat index 4)
    assert next_token_targets(labels, positions).tolist() == [[5, 6, 7]]
    logits = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    assert torch.equal(at_positions(logits, positions), logits.view(8, 3)[[1, 2, 4]][None])


@pytest.fixture(scope="module")
def batch():
    ids, mask = tiny.batch_with_placeholders([[(TOKEN, N)], [], [(TOKEN, N)] * 2], seq_len=48)
    labels = ids.masked_fill((mask == 0) | (ids == TOKEN), -100)
    labels[:, :8] = -100  # the prompt unsupervised
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": tiny.pixels(3)}


def model() -> MultimodalModel:
    torch.manual_seed(0)
    mllm = MultimodalModel({"vision": ModalEncoderModule(tiny.vision_model("clip"))}, tiny.llm("llama"))
    mllm.set_modality_token_ids({"vision": TOKEN})
    return mllm.train()


def full_forward(mllm: MultimodalModel, batch: dict):
    mllm.supervised_logits_only = False
    try:
        return mllm(**batch)
    finally:
        mllm.supervised_logits_only = True


@pytest.mark.parametrize("mode", ["computed", "given", "checkpointing", "num_items"])
def test_same_loss_and_gradients_as_full_logits(batch, mode):
    mllm = model()
    kwargs = dict(batch)
    if mode == "given":  # as the data module passes them, computed on the CPU beforehand
        kwargs["supervised_positions"] = supervised_positions(batch["labels"])
    if mode == "checkpointing":
        mllm.gradient_checkpointing_enable()
    if mode == "num_items":  # gradient accumulation: the sum divided by the tokens of all micro-batches
        kwargs["num_items_in_batch"] = torch.tensor(100)
    out = mllm(**kwargs)
    assert out.logits.shape[:2] == (1, int((batch["labels"][:, 1:] != -100).sum()))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in mllm.named_parameters() if p.grad is not None}
    mllm.zero_grad()
    full = full_forward(mllm, kwargs)
    torch.testing.assert_close(out.loss, full.loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.logits, at_positions(full.logits, out.logits_positions), atol=1e-5, rtol=1e-5)
    full.loss.backward()
    for name, p in mllm.named_parameters():
        if name in grads:
            torch.testing.assert_close(grads[name], p.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_eval_and_unlabelled_forwards_keep_full_logits(batch):
    mllm = model()
    assert mllm(**{k: v for k, v in batch.items() if k != "labels"}).logits.shape == (3, 48, tiny.VOCAB)
    mllm.eval()
    assert mllm(**batch).logits.shape == (3, 48, tiny.VOCAB)
