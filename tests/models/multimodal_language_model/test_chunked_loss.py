"""The fused, chunked LM head + loss: the same loss and gradients as the head and cross-entropy computed apart."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cornstarch.models.multimodal_language_model import ModalEncoderModule, MultimodalModel
from cornstarch.models.multimodal_language_model.chunked_loss import chunked_head_loss, fusable_head
from tests import tiny

TOKEN = tiny.VOCAB + 3
N = tiny.VISION_TOKENS["clip"]


def reference(hidden, head: nn.Linear, targets, softcap=None, divisor=None):
    logits = head(hidden).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if divisor is None:
        return F.cross_entropy(logits, targets, ignore_index=-100), logits
    return F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum") / divisor, logits


def grads_of(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("softcap", [None, 2.5])
def test_function_matches_unfused_head_and_cross_entropy(chunk, bias, softcap):
    torch.manual_seed(0)
    head = nn.Linear(16, 40, bias=bias)
    hidden = torch.randn(7, 16, requires_grad=True)
    targets = torch.tensor([3, -100, 7, 7, 39, -100, 0])
    loss, predictions = chunked_head_loss(hidden, head.weight, head.bias, targets, chunk, softcap)
    ref, logits = reference(hidden, head, targets, softcap)
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    assert torch.equal(predictions, logits.argmax(-1))
    params = (hidden, head.weight) + ((head.bias,) if bias else ())
    # an incoming gradient other than 1 scales every gradient (here: the loss is doubled)
    for got, want in zip(grads_of(2 * loss, *params), grads_of(2 * ref, *params)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_num_items_in_batch_divides_the_sum():
    torch.manual_seed(0)
    head = nn.Linear(8, 20, bias=False)
    hidden = torch.randn(5, 8, requires_grad=True)
    targets = torch.tensor([1, 2, -100, 4, 5])
    loss, _ = chunked_head_loss(hidden, head.weight, None, targets, 2, num_items_in_batch=torch.tensor(10))
    ref, _ = reference(hidden, head, targets, divisor=10)
    torch.testing.assert_close(loss, ref)
    for got, want in zip(grads_of(loss, hidden, head.weight), grads_of(ref, hidden, head.weight)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_bfloat16_matches_the_unfused_bfloat16_head():
    torch.manual_seed(0)
    head = nn.Linear(32, 64, bias=False).to(torch.bfloat16)
    hidden = torch.randn(9, 32, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 64, (9,))
    loss, _ = chunked_head_loss(hidden, head.weight, None, targets, 4)
    ref, _ = reference(hidden, head, targets)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, atol=1e-3, rtol=1e-3)
    got, want = grads_of(loss, hidden, head.weight), grads_of(ref, hidden, head.weight)
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), w.float(), atol=2e-3, rtol=2e-2)


def test_without_grad_mode_nothing_is_differentiated():
    head = nn.Linear(8, 20)
    with torch.no_grad():
        loss, _ = chunked_head_loss(torch.randn(3, 8), head.weight, head.bias, torch.tensor([1, 2, 3]), 2)
    assert not loss.requires_grad and torch.isfinite(loss)


def test_second_backward_and_bad_chunk_size_are_refused():
    head = nn.Linear(8, 20)
    loss, _ = chunked_head_loss(torch.randn(3, 8, requires_grad=True), head.weight, head.bias,
                                torch.tensor([1, 2, 3]), 2)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot run twice"):
        loss.backward()
    with pytest.raises(ValueError, match="positive"):
        chunked_head_loss(torch.randn(3, 8), head.weight, None, torch.tensor([1, 2, 3]), 0)


# ----------------------------------------------------------------------------------------------- in the model
def batch():
    ids, mask = tiny.batch_with_placeholders([[(TOKEN, N)], [], [(TOKEN, N)] * 2], seq_len=48)
    labels = ids.masked_fill((mask == 0) | (ids == TOKEN), -100)
    labels[:, :8] = -100  # the prompt unsupervised
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": tiny.pixels(3)}


def model(family: str) -> MultimodalModel:
    torch.manual_seed(0)
    mllm = MultimodalModel({"vision": ModalEncoderModule(tiny.vision_model("clip"))}, tiny.llm(family))
    mllm.set_modality_token_ids({"vision": TOKEN})
    return mllm.train()


@pytest.mark.parametrize("family", sorted(tiny.LLM_CLASSES))
def test_model_same_loss_gradients_and_argmax_as_the_lm_head(family):
    """Every LM family tested: fused chunks (5 tokens) against the LM's own head at the supervised positions."""
    plain = model(family)
    fused = copy.deepcopy(plain)
    fused.loss_chunk_size = 5
    assert fusable_head(fused.language_model) is not None
    if family == "gemma2":
        assert fusable_head(fused.language_model)[1] == fused.language_model.config.final_logit_softcapping
    inputs = batch()
    outputs = []
    for mllm in (plain, fused):
        torch.manual_seed(1)  # the same dropout masks (GPT-2 drops out in training)
        outputs.append(mllm(**inputs))
    want, got = outputs
    assert got.logits is None and torch.equal(got.logits_positions, want.logits_positions)
    assert torch.equal(got.predictions, want.logits.argmax(-1))
    torch.testing.assert_close(got.loss, want.loss, atol=1e-6, rtol=1e-6)
    want.loss.backward()
    got.loss.backward()
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_eval_keeps_full_logits_and_unknown_heads_fall_back():
    mllm = model("llama")
    mllm.loss_chunk_size = 4
    mllm.eval()
    assert mllm(**batch()).logits.shape == (3, 48, tiny.VOCAB)
    mllm.train()
    mllm.language_model.lm_head = nn.Sequential(mllm.language_model.lm_head)  # not a plain nn.Linear any more
    with pytest.warns(UserWarning, match="its own head"):
        out = mllm(**batch())
    assert out.logits is not None and out.predictions is None
