"""MultimodalProcessor as code ported from transformers processors and from the reference page expects it."""

from __future__ import annotations

import torch
import transformers as tf

from cornstarch.models.multimodal_language_model import ModalEncoderModule, MultimodalModel, MultimodalProcessor
from tests import tiny

# Renders string contents as they are and content parts as placeholder / text (as VLM templates do).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'].upper() }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image> {% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def sixteen_per_image(inputs, outputs):
    """A module-level count function: it can be saved by import path."""
    return [16] * len(outputs["pixel_values"])


def vision_processor(**kwargs) -> tuple[MultimodalProcessor, tf.PreTrainedTokenizerBase]:
    tok = tiny.tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    proc = MultimodalProcessor({"vision": tiny.image_processor("clip")}, tok,
                               num_feature_calculation_funcs={"vision": sixteen_per_image}, **kwargs)
    return proc, tok


def test_decode_and_batch_decode_are_the_tokenizers():
    proc, tok = vision_processor(predefined_tokens={"vision": "<image>"})
    batch = proc({"vision": {"images": tiny.pil_images(1)}}, {"text": ["USER: <image> what is this", "hello"]})
    ids = batch["input_ids"]
    for skip in (False, True):
        assert proc.decode(ids[0], skip_special_tokens=skip) == tok.decode(ids[0], skip_special_tokens=skip)
        assert proc.batch_decode(ids, skip_special_tokens=skip) == tok.batch_decode(ids, skip_special_tokens=skip)
    assert proc.decode(ids[1].tolist()) == tok.decode(ids[1].tolist())
    assert "<image>" in proc.decode(ids[0]) and "<image>" not in proc.decode(ids[0], skip_special_tokens=True)


MESSAGES = [[{"role": "user", "content": "<image> what is this"}, {"role": "assistant", "content": "seven"}],
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this"}]}]]


def test_apply_chat_template_is_the_tokenizers():
    proc, tok = vision_processor(predefined_tokens={"vision": "<image>"})
    for messages in MESSAGES:
        for extra in ({}, {"add_generation_prompt": True}):
            text = proc.apply_chat_template(messages, tokenize=False, **extra)
            assert text == tok.apply_chat_template(messages, tokenize=False, **extra)
            assert isinstance(text, str) and "<image>" in text
            assert proc.apply_chat_template(messages, **extra) == text  # processors render text by default
            ids = proc.apply_chat_template(messages, tokenize=True, **extra)
            assert ids == tok.apply_chat_template(messages, tokenize=True, **extra)
            assert ids["input_ids"].count(proc.token_ids["vision"]) == 1  # placeholders are not expanded here
    batch = [MESSAGES[0][:1], MESSAGES[1]]
    assert proc.apply_chat_template(batch, add_generation_prompt=True) == tok.apply_chat_template(
        batch, tokenize=False, add_generation_prompt=True)
    other = "{% for m in messages %}{{ m['content'] }}|{% endfor %}"
    assert proc.apply_chat_template(MESSAGES[0], chat_template=other) == "<image> what is this|seven|"


def test_rendered_chat_feeds_the_call():
    proc, _ = vision_processor(predefined_tokens={"vision": "<image>"})
    text = proc.apply_chat_template(MESSAGES[1], add_generation_prompt=True)
    batch = proc({"vision": {"images": tiny.pil_images(1)}}, {"text": text, "add_special_tokens": False})
    assert int((batch["input_ids"] == proc.token_ids["vision"]).sum()) == 16
    assert int((batch["input_ids"] == proc.tokenizer.bos_token_id).sum()) == 1


def test_reference_attributes_are_the_constructors_objects():
    tok = tiny.tokenizer()
    processors = {"vision": tiny.image_processor("clip"), "audio": tiny.audio_processor()}
    funcs = {"vision": sixteen_per_image}
    proc = MultimodalProcessor(processors, tok, num_feature_calculation_funcs=funcs)
    assert proc.llm_tokenizer is tok and proc.tokenizer is tok
    assert proc.encoder_processors is processors and proc.num_feature_calculation_funcs is funcs
    assert processors == {"vision": processors["vision"], "audio": processors["audio"]}  # not modified
    assert funcs == {"vision": sixteen_per_image}
    assert MultimodalProcessor(processors, tiny.tokenizer()).num_feature_calculation_funcs == {}


def test_model_input_names_are_what_a_call_returns():
    torch.manual_seed(0)
    mllm = MultimodalModel({"vision": ModalEncoderModule(tiny.vision_model("clip")),
                            "audio": ModalEncoderModule(tiny.audio_model("whisper"))}, tiny.llm("llama"))
    proc = MultimodalProcessor({"vision": tiny.image_processor("clip"), "audio": tiny.audio_processor()},
                               tiny.tokenizer(), model=mllm)
    batch = proc({"vision": {"images": tiny.pil_images(1)}, "audio": {"raw_speech": tiny.waveforms(1)}},
                 {"text": "<vision> <audio> what is this"}, sampling_rate=tiny.AUDIO_RATE)
    assert proc.model_input_names == ["input_ids", "attention_mask", "pixel_values", "input_features"]
    assert set(proc.model_input_names) == set(batch)


def test_reference_page_snippet_runs_unchanged():
    # As the reference's preprocessing page writes it, with tiny local parts in place of hub checkpoints.
    from transformers import CLIPImageProcessor, WhisperFeatureExtractor

    torch.manual_seed(0)
    model = MultimodalModel({"vision": ModalEncoderModule(tiny.vision_model("clip")),
                             "audio": ModalEncoderModule(tiny.audio_model("whisper"))}, tiny.llm("llama"))
    llm_tokenizer = tiny.tokenizer()
    mm_processor = MultimodalProcessor(
        encoder_processors={
            "vision": CLIPImageProcessor(size={"shortest_edge": tiny.IMAGE_SIZE},
                                         crop_size={"height": tiny.IMAGE_SIZE, "width": tiny.IMAGE_SIZE}),
            "audio": WhisperFeatureExtractor(feature_size=tiny.MEL_BINS, sampling_rate=tiny.AUDIO_RATE,
                                             hop_length=160, chunk_length=2, n_fft=400),
        },
        llm_tokenizer=llm_tokenizer,
        model=model,
        num_feature_calculation_funcs={},
        predefined_tokens={"vision": "<image>"},
    )
    assert {"<image>", "<audio>"} <= set(mm_processor.llm_tokenizer.all_special_tokens)
    outputs = mm_processor(
        encoder_inputs={"vision": {"images": tiny.pil_images(1)}, "audio": {"raw_speech": tiny.waveforms(1)}},
        llm_inputs={"text": "USER: <image> <audio> which digit"},
        return_tensors="pt",
        sampling_rate=tiny.AUDIO_RATE,
    )
    assert set(outputs) == {"input_ids", "attention_mask", "pixel_values", "input_features"}
    assert mm_processor.encoder_processors["vision"].crop_size == {"height": tiny.IMAGE_SIZE, "width": tiny.IMAGE_SIZE}
    assert mm_processor.num_feature_calculation_funcs == {} and mm_processor.llm_tokenizer is llm_tokenizer
    assert mm_processor.tokens == {"vision": "<image>", "audio": "<audio>"}
    model(**outputs)


def test_save_load_keeps_the_reference_attributes(tmp_path):
    proc = MultimodalProcessor({"vision": tiny.image_processor("clip"), "audio": tiny.audio_processor()},
                               tiny.tokenizer(), predefined_tokens={"vision": "<image>"},
                               num_feature_calculation_funcs={"vision": sixteen_per_image,
                                                              "audio": lambda inputs, outputs: [8] * len(outputs)})
    proc.save_pretrained(tmp_path)
    again = MultimodalProcessor.from_pretrained(tmp_path)
    assert isinstance(again.llm_tokenizer, tf.PreTrainedTokenizerBase) and again.tokenizer is again.llm_tokenizer
    assert again.llm_tokenizer.get_vocab() == proc.llm_tokenizer.get_vocab()
    assert type(again.encoder_processors) is dict and list(again.encoder_processors) == ["vision", "audio"]
    for key, processor in proc.encoder_processors.items():
        assert type(again.encoder_processors[key]) is type(processor)
        assert again.encoder_processors[key].to_dict() == processor.to_dict()
    # The module-level function comes back; the lambda cannot be saved and must be given again.
    assert again.num_feature_calculation_funcs == {"vision": sixteen_per_image}
    assert again.token_ids == proc.token_ids
    inputs = {"vision": {"images": tiny.pil_images(1)}}
    torch.testing.assert_close(again(inputs, {"text": "<image> hello"})["input_ids"],
                               proc(inputs, {"text": "<image> hello"})["input_ids"])
    relent = MultimodalProcessor.from_pretrained(tmp_path, num_feature_calculation_funcs={"audio": lambda i, o: [8]})
    assert set(relent.num_feature_calculation_funcs) == {"vision", "audio"}
