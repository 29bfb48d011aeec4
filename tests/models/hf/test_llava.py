"""Llava ↔ MultimodalModel / MultimodalProcessor: same logits (1e-5) and greedy tokens as
LlavaForConditionalGeneration, same processor outputs as LlavaProcessor, state dicts that survive the round trip,
and a ValueError naming each part a Llava cannot hold."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from cornstarch.models import ModalEncoderModule, MultimodalModel, MultimodalProcessor
from cornstarch.models.feature_selection import (
    SelectFeatures,
    penultimate_layer_without_cls,
    request_hidden_states,
    without_cls,
)
from tests import tiny
from tests.models.hf import natives
from tests.models.hf.natives import max_difference

CASES = {"layer-2_default": (-2, "default"), "layer-1_full": (-1, "full"), "layers-3-1_default": ([-2, -1], "default")}
TEXTS = ["USER : <image> what is this ?", "hello <image> world", "describe the picture"]


def native_batch(processor, padding_side="left"):
    """The native processor's batch: two images in the first two samples, text only in the third."""
    return processor(images=tiny.pil_images(2), text=TEXTS, return_tensors="pt", padding=True, padding_side=padding_side)


def assert_same_state(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("case,source", [(case, "instance") for case in CASES] + [("layer-2_default", "directory")])
def test_imported_llava_gives_native_logits_and_tokens(case, source, tmp_path):
    layer, strategy = CASES[case]
    native = natives.llava(layer, strategy)
    batch = native_batch(natives.llava_processor(strategy))
    if source == "directory":
        native.save_pretrained(tmp_path)
        mllm = MultimodalModel.from_hf(str(tmp_path)).eval()
    else:
        mllm = MultimodalModel.from_hf(native).eval()
    assert mllm.component_names() == ["vision.module", "vision.projector", "language_model"]
    natives.assert_like_native(mllm, native, batch)


@pytest.mark.parametrize("case", list(CASES))
def test_export_of_the_import_is_the_native_model(case, tmp_path):
    layer, strategy = CASES[case]
    native = natives.llava(layer, strategy, seed=1)
    native.save_pretrained(tmp_path)
    exported = MultimodalModel.from_hf(tmp_path).to_hf()
    assert type(exported) is tf.LlavaForConditionalGeneration
    assert_same_state(exported.state_dict(), native.state_dict())
    for name in ("vision_feature_layer", "vision_feature_select_strategy", "image_token_id", "projector_hidden_act"):
        assert getattr(exported.config, name) == getattr(native.config, name), name


def test_drop_unused_layers_keeps_logits_and_exports_the_shorter_tower():
    native = natives.llava(-2, "default")
    batch = native_batch(natives.llava_processor())
    with torch.no_grad():
        expected = native(**batch).logits
    layers = native.config.vision_config.num_hidden_layers
    mllm = MultimodalModel.from_hf(native, drop_unused_layers=True).eval()  # (the shared tower is truncated)
    assert mllm.vision_encoder.module.config.num_hidden_layers == layers - 1
    exported = mllm.to_hf()
    assert exported.config.vision_feature_layer == -1
    with torch.no_grad():
        assert max_difference(mllm(**batch).logits, expected) <= 1e-5
        assert max_difference(exported(**batch).logits, expected) <= 1e-5


def composed(selection: str) -> MultimodalModel:
    """CLIP + Llama composed in cornstarch, selecting Llava's default features in one of the supported ways."""
    torch.manual_seed(0)
    kwargs = {"select": dict(postprocess_module_callback=SelectFeatures(-2, "default")),
              "truncate": dict(feature_layer=-2, postprocess_module_callback=without_cls),
              "reference": dict(preprocess_callback=request_hidden_states,
                                postprocess_module_callback=penultimate_layer_without_cls)}[selection]
    mllm = MultimodalModel({"vision": ModalEncoderModule(tiny.vision_model("clip"), **kwargs)}, tiny.llm("llama"),
                           init_projector_type="mlp").eval()
    mllm.set_modality_token_ids({"vision": natives.tokenizer(natives.IMAGE_TOKEN).convert_tokens_to_ids("<image>")})
    return mllm


@pytest.mark.parametrize("selection", ["select", "truncate", "reference"])
def test_composed_model_exports_to_llava_with_its_logits_and_tokens(selection):
    mllm = composed(selection)
    natives.assert_like_native(mllm, mllm.to_hf().eval(), native_batch(natives.llava_processor()))


def test_imported_model_trains_by_component_and_saves_like_a_composed_one(tmp_path):
    native = natives.llava()
    batch = native_batch(natives.llava_processor(), padding_side="right")
    mllm = MultimodalModel.from_hf(native)
    state = mllm.set_trainable_components(["vision.projector"])
    assert state == {"vision.module": False, "vision.projector": True, "language_model": False}
    mllm.save_pretrained(tmp_path)
    again = MultimodalModel.from_pretrained(tmp_path).eval()
    assert isinstance(again.vision_encoder.postprocess_module_callback, SelectFeatures)
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, mllm.eval()(**batch).logits)


def test_lora_and_fsdp_units_work_on_an_imported_model():
    from peft import LoraConfig, get_peft_model

    from cornstarch.lit.sharding import unit_components, wrap_units

    native = natives.llava()
    batch = native_batch(natives.llava_processor())
    with torch.no_grad():
        expected = native(**batch).logits
    mllm = MultimodalModel.from_hf(native).eval()
    units = wrap_units(mllm)
    assert all(len(parts) == 1 for parts in unit_components(mllm, units).values())
    mllm.language_model = get_peft_model(mllm.language_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert mllm.component_names() == ["vision.module", "vision.projector", "language_model", "lora"]
    with pytest.raises(ValueError, match=r"carries LoRA adapters, which Llava cannot hold; merge them first"):
        mllm.to_hf()
    mllm.language_model = mllm.language_model.merge_and_unload()
    with torch.no_grad():
        assert max_difference(mllm.to_hf()(**batch).logits, expected) <= 1e-5  # fresh adapters change nothing


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_processor_gives_the_native_inputs_and_keeps_the_chat_template(strategy, tmp_path):
    native = natives.llava_processor(strategy)
    processor = MultimodalProcessor.from_hf(native)
    expected = native_batch(native, padding_side="right")
    got = processor({"vision": {"images": tiny.pil_images(2)}}, {"text": TEXTS})
    assert set(got) == set(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this ?"}]}]
    assert processor.apply_chat_template(messages) == native.apply_chat_template(messages)

    processor.save_pretrained(tmp_path)  # the count function is saved with its settings
    again = MultimodalProcessor.from_pretrained(tmp_path)
    assert torch.equal(again({"vision": {"images": tiny.pil_images(2)}}, {"text": TEXTS})["input_ids"],
                       expected["input_ids"])
    exported = processor.to_hf()
    assert type(exported) is tf.LlavaProcessor
    assert exported.vision_feature_select_strategy == strategy and exported.chat_template == native.chat_template
    for name, value in native_batch(exported, padding_side="right").items():
        assert torch.equal(value, expected[name]), name


def test_processor_of_a_composed_model_exports_to_llava():
    mllm = composed("select")
    processor = MultimodalProcessor({"vision": tiny.image_processor("clip")}, natives.tokenizer(natives.IMAGE_TOKEN),
                                    model=mllm, predefined_tokens={"vision": natives.IMAGE_TOKEN})
    exported = processor.to_hf()
    ours = processor({"vision": {"images": tiny.pil_images(2)}}, {"text": TEXTS})
    assert torch.equal(native_batch(exported, padding_side="right")["input_ids"], ours["input_ids"])


# ------------------------------------------------------------------------------------------- what a Llava cannot hold
def two_encoders() -> MultimodalModel:
    encoders = {"vision": ModalEncoderModule(tiny.vision_model("clip"), postprocess_module_callback=without_cls),
                "audio": ModalEncoderModule(tiny.audio_model("whisper"))}
    return MultimodalModel(encoders, tiny.llm("llama"), init_projector_type="mlp")


def unknown_callback() -> MultimodalModel:
    mllm = composed("select")
    mllm.vision_encoder.postprocess_projector_callback = lambda inputs, output: output
    return mllm


def linear_projector() -> MultimodalModel:
    mllm = MultimodalModel({"vision": ModalEncoderModule(tiny.vision_model("clip"))}, tiny.llm("llama"))
    mllm.set_modality_token_ids({"vision": 36})
    return mllm


def token_outside_vocabulary() -> MultimodalModel:
    mllm = composed("select")
    mllm.set_modality_token_ids({"vision": tiny.VOCAB})
    return mllm


def soft_capped_lm() -> MultimodalModel:
    mllm = MultimodalModel({"vision": ModalEncoderModule(tiny.vision_model("clip"),
                                                         postprocess_module_callback=without_cls)},
                           tiny.llm("gemma2"), init_projector_type="mlp")
    mllm.set_modality_token_ids({"vision": 36})
    return mllm


def audio_only() -> MultimodalModel:
    return MultimodalModel({"audio": ModalEncoderModule(tiny.audio_model("whisper"))}, tiny.llm("llama"))


def normalised_output() -> MultimodalModel:
    mllm = MultimodalModel({"vision": ModalEncoderModule(tiny.vision_model("siglip"))}, tiny.llm("llama"),
                           init_projector_type="mlp")
    mllm.set_modality_token_ids({"vision": 36})
    return mllm


UNSUPPORTED = {
    "two_encoders": (two_encoders, r"native models hold one encoder; this model has 2: \['vision', 'audio'\]"),
    "unknown_callback": (unknown_callback, r"postprocess_projector_callback .*<lambda>.* no equivalent in Llava"),
    "linear_projector": (linear_projector, r"vision projector is a 'linear' projector; Llava holds a 'mlp'"),
    "token_outside_vocabulary": (token_outside_vocabulary, r"token id 128 lies outside the language model's vocab"),
    "soft_capped_lm": (soft_capped_lm, r"changes its logits after the head \(final_logit_softcapping\)"),
    "audio_encoder": (audio_only, r"No native model holds a WhisperEncoder as audio encoder; supported: Llava"),
    "normalised_output": (normalised_output, r"siglip_vision_model output, which is normalised .* SelectFeatures"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_compositions_name_the_part(case):
    build, message = UNSUPPORTED[case]
    with pytest.raises(ValueError, match=message):
        build().to_hf()


def test_unsupported_processor_and_sources_name_the_part(tmp_path):
    two = MultimodalProcessor({"vision": tiny.image_processor("clip"), "audio": tiny.audio_processor()},
                              natives.tokenizer(), num_feature_calculation_funcs={"vision": len, "audio": len})
    with pytest.raises(ValueError, match=r"one encoder processor; this processor has 2: \['vision', 'audio'\]"):
        two.to_hf()
    odd_count = MultimodalProcessor({"vision": tiny.image_processor("clip")}, natives.tokenizer(),
                                    num_feature_calculation_funcs={"vision": len})
    with pytest.raises(ValueError, match=r"vision feature count \(builtin_function_or_method\) has no LlavaProcessor"):
        odd_count.to_hf()
    with pytest.raises(ValueError, match=r"LlamaForCausalLM is no supported native class"):
        MultimodalModel.from_hf(tiny.llm("llama"))
    tiny.llm("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"holds a .llama. model; supported: LlavaNextForConditionalGeneration"):
        MultimodalModel.from_hf(tmp_path)
    with pytest.raises(ValueError, match=r"drop_unused_layers needs one vision_feature_layer"):
        MultimodalModel.from_hf(natives.llava([-2, -1]), drop_unused_layers=True)
