"""MultimodalProcessor: token registration, built-in feature counts, expansion, Llava parity, save/load."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from cornstarch.models.feature_selection import penultimate_layer_without_cls, request_hidden_states
from cornstarch.models.multimodal_language_model import ModalEncoderModule, MultimodalModel, MultimodalProcessor
from tests import tiny


def vision_model(family: str, **callbacks) -> MultimodalModel:
    torch.manual_seed(0)
    return MultimodalModel({"vision": ModalEncoderModule(tiny.vision_model(family), **callbacks)}, tiny.llm("llama"))


def test_registers_tokens_and_keeps_existing_special_tokens():
    tok = tiny.tokenizer()
    before = set(tok.all_special_tokens)
    mllm = MultimodalModel({"vision": ModalEncoderModule(tiny.vision_model("clip")),
                            "audio": ModalEncoderModule(tiny.audio_model("whisper"))}, tiny.llm("llama"))
    proc = MultimodalProcessor({"vision": tiny.image_processor("clip"), "audio": tiny.audio_processor()}, tok,
                               model=mllm, predefined_tokens={"vision": "<image>"})
    assert proc.tokens == {"vision": "<image>", "audio": "<audio>"}
    assert before | {"<image>", "<audio>"} <= set(tok.all_special_tokens)
    assert mllm.modality_token_ids == proc.token_ids == {
        "vision": tok.convert_tokens_to_ids("<image>"), "audio": tok.convert_tokens_to_ids("<audio>")}
    assert min(proc.token_ids.values()) >= len(tiny.WORDS) + 4


@pytest.mark.parametrize("pad_side", ["right", "left"])
def test_same_input_ids_as_llava_processor(pad_side):
    tok = tiny.tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = tiny.image_processor("clip")
    llava = tf.LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=tiny.PATCH,
                              vision_feature_select_strategy="default", image_token="<image>",
                              num_additional_image_tokens=1)  # CLIP's CLS, as in llava-1.5's processor config
    mllm = vision_model("clip", preprocess_callback=request_hidden_states,
                        postprocess_module_callback=penultimate_layer_without_cls)
    ours = MultimodalProcessor({"vision": image_processor}, tok, model=mllm, predefined_tokens={"vision": "<image>"})
    prompts = ["USER: <image>\nwhat is this? ASSISTANT:", "USER: describe <image> and <image> ASSISTANT: two"]
    images = tiny.pil_images(3)
    tok.padding_side = pad_side
    ref = llava(images=images, text=prompts, padding=True, return_tensors="pt")
    out = ours({"vision": {"images": images}}, {"text": prompts, "padding_side": pad_side})
    assert torch.equal(out["input_ids"], ref["input_ids"])
    assert torch.equal(out["attention_mask"], ref["attention_mask"])
    torch.testing.assert_close(out["pixel_values"], ref["pixel_values"])
    assert int((out["input_ids"] == ours.token_ids["vision"]).sum()) == 3 * 16


# Placeholders where expanding by token id and expanding by text could tokenize differently with a byte-level BPE:
# at the start, glued to words on both sides, twice in a row, after a newline, before a space and punctuation.
BPE_CONVERSATIONS = [
    [{"role": "user", "content": "<image> what is this?"}, {"role": "assistant", "content": "seven"}],
    [{"role": "user", "content": "is this an<image>seven or a<image><image>nine"}],
    [{"role": "system", "content": "look:\n<image>"}, {"role": "user", "content": "which digit ,<image> ?"},
     {"role": "assistant", "content": "the digit 7"}],
]


@pytest.mark.parametrize("pad_side", ["right", "left"])
def test_same_input_ids_as_llava_processor_with_bpe_chat_template(pad_side):
    """The demo's byte-level BPE tokenizer and its chat template: the same ids as LlavaProcessor (which expands
    the placeholder in the text before tokenizing), wherever the placeholder sits."""
    from cornstarch.demo import demo_tokenizer

    tok = demo_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    assert "\u0120" in "".join(tok.convert_ids_to_tokens(tok("a b").input_ids))  # byte-level (Ġ = a space)
    prompts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=c[-1]["role"] == "user")
               for c in BPE_CONVERSATIONS]
    n_images = sum(p.count("<image>") for p in prompts)
    image_processor = tiny.image_processor("clip")
    llava = tf.LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=tiny.PATCH,
                              vision_feature_select_strategy="default", image_token="<image>",
                              num_additional_image_tokens=1)
    mllm = vision_model("clip", preprocess_callback=request_hidden_states,
                        postprocess_module_callback=penultimate_layer_without_cls)
    ours = MultimodalProcessor({"vision": image_processor}, tok, model=mllm, predefined_tokens={"vision": "<image>"})
    images = tiny.pil_images(n_images)
    tok.padding_side = pad_side
    ref = llava(images=images, text=prompts, padding=True, return_tensors="pt")
    out = ours({"vision": {"images": images}}, {"text": prompts, "padding_side": pad_side})
    assert torch.equal(out["input_ids"], ref["input_ids"])
    assert torch.equal(out["attention_mask"], ref["attention_mask"])
    assert int((out["input_ids"] == ours.token_ids["vision"]).sum()) == n_images * 16
    # the text around each placeholder decodes back to the prompt (nothing merged across a placeholder)
    row = out["input_ids"][1][out["attention_mask"][1] == 1]
    text = tok.decode(row[row != ours.token_ids["vision"]])
    assert text == prompts[1].replace("<image>", "")


MIXED = ["USER: hello ASSISTANT: zero", "USER: <image> what is this", "USER: <image> <image> and <image> ?"]


@pytest.mark.parametrize("family", ["clip", "siglip", "vit", "dinov2"])
def test_vision_end_to_end_with_0_1_and_3_images(family):
    mllm = vision_model(family)
    proc = MultimodalProcessor({"vision": tiny.image_processor(family)}, tiny.tokenizer(), model=mllm)
    prompts = [p.replace("<image>", "<vision>") for p in MIXED]
    batch = proc({"vision": {"images": tiny.pil_images(4)}}, {"text": prompts})
    assert int((batch["input_ids"] == proc.token_ids["vision"]).sum()) == 4 * tiny.VISION_TOKENS[family]
    out = mllm(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape


@pytest.mark.parametrize("family", ["whisper", "qwen2_audio"])
def test_audio_end_to_end(family):
    torch.manual_seed(0)
    mllm = MultimodalModel({"audio": ModalEncoderModule(tiny.audio_model(family))}, tiny.llm("qwen2"))
    proc = MultimodalProcessor({"audio": tiny.audio_processor()}, tiny.tokenizer(), model=mllm)
    prompts = ["USER: <audio> what is this", "USER: hello", "USER: <audio> and <audio> ?"]
    batch = proc({"audio": {"raw_speech": tiny.waveforms(3)}}, {"text": prompts}, sampling_rate=tiny.AUDIO_RATE)
    assert int((batch["input_ids"] == proc.token_ids["audio"]).sum()) == 3 * tiny.AUDIO_TOKENS[family]
    mllm(**batch)


def test_images_and_audio_together_and_save_load(tmp_path):
    torch.manual_seed(0)
    mllm = MultimodalModel({"vision": ModalEncoderModule(tiny.vision_model("siglip")),
                            "audio": ModalEncoderModule(tiny.audio_model("whisper"))}, tiny.llm("gemma"))
    proc = MultimodalProcessor({"vision": tiny.image_processor("siglip"), "audio": tiny.audio_processor()},
                               tiny.tokenizer(), model=mllm)
    prompts = ["USER: <vision> <audio> which digit", "USER: hello", "USER: <vision> <vision> ?", "USER: <audio>"]
    inputs = {"vision": {"images": tiny.pil_images(3)}, "audio": {"raw_speech": tiny.waveforms(2)}}
    batch = proc(inputs, {"text": prompts}, sampling_rate=tiny.AUDIO_RATE)
    assert batch["pixel_values"].shape[0] == 3 and batch["input_features"].shape[0] == 2
    mllm(**batch)

    proc.save_pretrained(tmp_path)
    again = MultimodalProcessor.from_pretrained(tmp_path)  # counts from the saved encoder configs, no model
    batch2 = again(inputs, {"text": prompts}, sampling_rate=tiny.AUDIO_RATE)
    assert again.token_ids == proc.token_ids
    for key in batch:
        torch.testing.assert_close(batch2[key], batch[key])


def test_callback_changes_count_through_declared_helper():
    mllm = vision_model("clip", preprocess_callback=request_hidden_states,
                        postprocess_module_callback=penultimate_layer_without_cls)
    proc = MultimodalProcessor({"vision": tiny.image_processor("clip")}, tiny.tokenizer(), model=mllm)
    batch = proc({"vision": {"images": tiny.pil_images(1)}}, {"text": "USER: <vision> ?"})
    assert int((batch["input_ids"] == proc.token_ids["vision"]).sum()) == 16
    mllm(**batch)


def test_user_count_function_overrides_and_nested_counts():
    def newline_count(inputs, outputs):
        return [[18] for _ in inputs["images"]]  # e.g. a callback adding a newline vector per image

    proc = MultimodalProcessor({"vision": tiny.image_processor("clip")}, tiny.tokenizer(),
                               num_feature_calculation_funcs={"vision": newline_count})
    batch = proc({"vision": {"images": tiny.pil_images(2)}}, {"text": ["<vision>", "a <vision>"]})
    assert int((batch["input_ids"] == proc.token_ids["vision"]).sum()) == 36


@pytest.mark.parametrize("prompts,n_images,message", [
    (["<vision>", "<vision> <vision>"], 2, r"Sample 1: 2 <vision> placeholder\(s\) but only 1 vision item\(s\) left"),
    (["<vision>", "hello"], 2, r"Fewer <vision> placeholders than vision items: the text has 1 .* but 2"),
])
def test_placeholder_item_mismatch(prompts, n_images, message):
    mllm = vision_model("clip")
    proc = MultimodalProcessor({"vision": tiny.image_processor("clip")}, tiny.tokenizer(), model=mllm)
    with pytest.raises(ValueError, match=message):
        proc({"vision": {"images": tiny.pil_images(n_images)}}, {"text": prompts})


def test_max_length_never_cuts_a_modality_span():
    mllm = vision_model("clip")
    proc = MultimodalProcessor({"vision": tiny.image_processor("clip")}, tiny.tokenizer(), model=mllm)
    images = {"vision": {"images": tiny.pil_images(1)}}
    with pytest.raises(ValueError, match=r"Sample 0 has 20 tokens, more than max_length=10, and truncation would cut"):
        proc(images, {"text": "what <vision> is", "max_length": 10, "truncation": True})
    out = proc(images, {"text": "<vision> what is this", "max_length": 20, "truncation": True})
    assert out["input_ids"].shape == (1, 20) and int((out["input_ids"] == proc.token_ids["vision"]).sum()) == 17
    with pytest.raises(ValueError, match="truncation is off"):
        proc(images, {"text": "<vision> what is this", "max_length": 20})


def test_no_way_to_count_and_unknown_modality():
    proc = MultimodalProcessor({"vision": tiny.image_processor("clip")}, tiny.tokenizer())
    with pytest.raises(ValueError, match=r"Cannot count the vision features: give the processor model="):
        proc({"vision": {"images": tiny.pil_images(1)}}, {"text": "<vision>"})
    with pytest.raises(ValueError, match=r"No processor for modality 'audio'"):
        proc({"audio": {"raw_speech": tiny.waveforms(1)}}, {"text": "<audio>"})
    with pytest.raises(ValueError, match=r"Processors for \['audio'\], but the model's encoders are \['vision'\]"):
        MultimodalProcessor({"audio": tiny.audio_processor()}, tiny.tokenizer(), model=vision_model("clip"))
