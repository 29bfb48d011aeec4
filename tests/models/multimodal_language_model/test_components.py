"""The model's components: one definition used by train(encoders_mode=...), schedules, optimizer groups and FSDP."""

from __future__ import annotations

import logging

import pytest
from peft import LoraConfig, get_peft_model

from cornstarch.models.multimodal_language_model import ModalEncoderModule, MultimodalModel
from tests import tiny


def build(lora: bool = False) -> MultimodalModel:
    llm = tiny.llm("llama")
    if lora:
        llm = get_peft_model(llm, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    return MultimodalModel({"vision": ModalEncoderModule(tiny.vision_model("clip")),
                            "audio": ModalEncoderModule(tiny.audio_model("whisper"))}, llm)


def trains(mllm: MultimodalModel) -> dict[str, set[bool]]:
    return {name: {p.requires_grad for _, p in params} for name, params in mllm.components().items()}


@pytest.mark.parametrize("lora", [False, True])
def test_components_partition_the_parameters_under_their_qualified_names(lora):
    mllm = build(lora)
    parts = mllm.components()
    expected = ["vision.module", "vision.projector", "audio.module", "audio.projector", "language_model"]
    assert list(parts) == expected + (["lora"] if lora else [])
    assert mllm.component_names() == list(parts)
    named = dict(mllm.named_parameters())
    listed = [(n, p) for params in parts.values() for n, p in params]
    assert len(listed) == len(named) and {n for n, _ in listed} == set(named)  # every parameter exactly once
    assert all(named[n] is p for n, p in listed)
    assert all(n.startswith("vision_encoder.projector.") for n, _ in parts["vision.projector"])
    if lora:
        assert parts["lora"] and all("lora_" in n for n, _ in parts["lora"])
        assert not any("lora_" in n for n, _ in parts["language_model"])


def test_set_trainable_components_exactly_or_by_mapping():
    mllm = build(lora=True).train()
    state = mllm.set_trainable_components(["vision.projector", "lora"])
    assert state == {"vision.module": False, "vision.projector": True, "audio.module": False,
                     "audio.projector": False, "language_model": False, "lora": True}
    assert trains(mllm)["lora"] == {True} and trains(mllm)["language_model"] == {False}
    assert mllm.trainable_components() == ["vision.projector", "lora"]
    assert not mllm.vision_encoder.module.training and mllm.vision_encoder.projector.training
    mllm.set_trainable_components({"audio.module": True})  # a mapping changes only what it names
    assert mllm.trainable_components() == ["vision.projector", "audio.module", "lora"]
    assert mllm.audio_encoder.module.training, "an unfrozen part leaves eval mode"
    with pytest.raises(ValueError, match=r"\['text.module'\] is not a component.*vision.module"):
        mllm.set_trainable_components(["text.module"])


def test_train_encoders_mode_is_the_same_component_switch():
    a, b = build(lora=True), build(lora=True)
    a.train(encoders_mode={"vision": (False, True), "audio": (True, False)}, llm_mode=False)
    b.set_trainable_components(["vision.projector", "audio.module"])
    assert trains(a) == trains(b)
    a.train(llm_mode=True)  # the LM and its adapters together
    assert a.trainable_components() == ["vision.projector", "audio.module", "language_model", "lora"]


def test_each_decision_is_logged_per_component(caplog):
    mllm = build()
    with caplog.at_level(logging.INFO, logger="cornstarch.models.multimodal_language_model.components"):
        mllm.set_trainable_components(["language_model"])
    lines = [r.getMessage() for r in caplog.records]
    n_lm = sum(p.numel() for p in mllm.language_model.parameters())
    assert any(line.split()[:2] == ["language_model", "trains"] and f"({n_lm} parameters)" in line for line in lines)
    assert any(line.split()[:2] == ["vision.module", "frozen"] for line in lines)
    assert len(lines) == 5
