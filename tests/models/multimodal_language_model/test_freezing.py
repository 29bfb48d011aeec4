"""train(encoders_mode=..., llm_mode=...) freezing, and the nn.Module train/eval contract."""

from __future__ import annotations

import torch
from torch import nn

from cornstarch.models.multimodal_language_model import ModalEncoderModule, MultimodalModel
from tests import tiny

TOKEN = tiny.VOCAB + 1


def build() -> tuple[MultimodalModel, dict]:
    torch.manual_seed(0)
    config = tiny.vision_config("clip")
    config.attention_dropout = 0.5  # dropout makes train/eval observable
    clip = tiny.VISION_CLASSES["clip"](config)
    mllm = MultimodalModel({"vision": ModalEncoderModule(clip)}, tiny.llm("llama"), init_projector_type="mlp")
    mllm.set_modality_token_ids({"vision": TOKEN})
    ids, mask = tiny.batch_with_placeholders([[(TOKEN, 17)], [(TOKEN, 17)]], seq_len=32)
    return mllm, dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100),
                      pixel_values=tiny.pixels(2))


def requires_grad(module: nn.Module) -> set[bool]:
    return {p.requires_grad for p in module.parameters()}


def test_train_modes_set_requires_grad_and_return_self():
    mllm, _ = build()
    encoder = mllm.vision_encoder
    assert mllm.train(encoders_mode={"vision": (False, True)}, llm_mode=False) is mllm
    assert requires_grad(encoder.module) == {False}
    assert requires_grad(encoder.projector) == {True}
    assert requires_grad(mllm.language_model) == {False}
    assert not encoder.module.training and not mllm.language_model.training, "frozen parts stay in eval mode"
    assert encoder.projector.training and mllm.training

    mllm.train(encoders_mode={"vision": (True, False)})  # llm_mode omitted: LM unchanged
    assert requires_grad(encoder.module) == {True}
    assert requires_grad(encoder.projector) == {False}
    assert requires_grad(mllm.language_model) == {False}
    mllm.train({"vision": (True, True)}, llm_mode=True)  # the dict may come positionally
    assert requires_grad(mllm) == {True}


def test_plain_train_eval_and_parent_train_keep_module_contract():
    mllm, _ = build()
    assert mllm.eval() is mllm and not any(m.training for m in mllm.modules())
    assert mllm.train(False) is mllm and not any(m.training for m in mllm.modules())
    assert mllm.train() is mllm and all(m.training for m in mllm.modules())
    mllm.train(encoders_mode={"vision": (False, True)})
    parent = nn.Sequential(mllm)
    parent.train()
    assert mllm.training and mllm.vision_encoder.projector.training
    assert not mllm.vision_encoder.module.training, "a parent's .train() keeps the frozen tower in eval"
    parent.eval()
    assert not any(m.training for m in mllm.modules())


def test_frozen_encoder_builds_no_graph_and_gets_no_grads():
    mllm, batch = build()
    mllm.train(encoders_mode={"vision": (False, True)}, llm_mode=True)
    seen = {}
    mllm.vision_encoder.module.register_forward_hook(lambda m, i, o: seen.update(out=o.last_hidden_state))
    mllm(**batch).loss.backward()
    assert seen["out"].grad_fn is None and not seen["out"].requires_grad
    assert all(p.grad is None for p in mllm.vision_encoder.module.parameters())
    assert all(p.grad is not None for p in mllm.vision_encoder.projector.parameters())


def test_projector_trains_through_a_frozen_llm():
    mllm, batch = build()
    mllm.train(encoders_mode={"vision": (False, True)}, llm_mode=False)
    mllm(**batch).loss.backward()
    assert all(p.grad is None for p in mllm.language_model.parameters())
    grads = [p.grad for p in mllm.vision_encoder.projector.parameters()]
    assert all(g is not None and torch.count_nonzero(g) > 0 for g in grads)


def test_trainable_encoder_gets_grads_and_dropout_follows_mode():
    mllm, batch = build()
    mllm.train()
    mllm(**batch).loss.backward()
    assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in mllm.vision_encoder.module.parameters())
    mllm.eval()
    with torch.no_grad():
        a, b = mllm(**batch).logits, mllm(**batch).logits
    assert torch.equal(a, b)
    mllm.train()
    with torch.no_grad():
        c, d = mllm(**batch).logits, mllm(**batch).logits
    assert not torch.equal(c, d), "dropout is active in train mode"
