"""Qwen2-Audio ↔ MultimodalModel / MultimodalProcessor: clips of different lengths in one batch give
Qwen2AudioForConditionalGeneration's logits (1e-5) and greedy tokens, the processor gives Qwen2AudioProcessor's
inputs, the state dict survives the round trip, and compositions Qwen2-Audio cannot hold are refused by name."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from cornstarch.models import ModalEncoderModule, MultimodalModel, MultimodalProcessor
from cornstarch.models.audio_lengths import AudioFeaturesWithLengths, TrimAudioFeatures
from tests import tiny
from tests.models.hf import natives
from tests.models.hf.natives import max_difference

TEXTS = ["USER : <|audio_bos|><|AUDIO|><|audio_eos|> what is this ?", "hello <|audio_bos|><|AUDIO|><|audio_eos|> sound",
         "describe the sound"]
LENGTHS = [5120, 2000]  # a full clip (8 features) and a short one (its padded frames masked: 4 features)


def native_batch(processor=None, padding_side="left"):
    processor = processor or natives.qwen2_audio_processor()
    return processor(text=TEXTS, audio=natives.waveforms(LENGTHS), sampling_rate=tiny.AUDIO_RATE,
                     return_tensors="pt", padding=True, padding_side=padding_side)


@pytest.mark.parametrize("source", ["instance", "directory"])
def test_imported_qwen2_audio_gives_native_logits_and_tokens(source, tmp_path):
    native = natives.qwen2_audio()
    batch = native_batch()
    assert batch["feature_attention_mask"].sum(-1).tolist() == [32, 13]
    if source == "directory":
        native.save_pretrained(tmp_path)
    mllm = MultimodalModel.from_hf(tmp_path if source == "directory" else native).eval()
    assert mllm.component_names() == ["audio.module", "audio.projector", "language_model"]
    natives.assert_like_native(mllm, native, batch)


def test_export_of_the_import_is_the_native_model(tmp_path):
    native = natives.qwen2_audio(seed=1)
    native.save_pretrained(tmp_path)
    mllm = MultimodalModel.from_hf(tmp_path)
    exported = mllm.to_hf()
    assert type(exported) is tf.Qwen2AudioForConditionalGeneration
    expected = native.state_dict()
    got = exported.state_dict()
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    assert exported.config.audio_token_id == native.config.audio_token_id

    mllm.save_pretrained(tmp_path / "cornstarch")  # the audio callbacks are saved and rebuilt
    again = MultimodalModel.from_pretrained(tmp_path / "cornstarch").eval()
    batch = native_batch(padding_side="right")
    with torch.no_grad():
        assert max_difference(again(**batch).logits, native(**batch).logits) <= 1e-5


def test_processor_gives_the_native_inputs(tmp_path):
    native = natives.qwen2_audio_processor()
    processor = MultimodalProcessor.from_hf(native)
    expected = native_batch(native, padding_side="right")
    got = processor({"audio": {"audio": natives.waveforms(LENGTHS)}}, {"text": TEXTS}, sampling_rate=tiny.AUDIO_RATE)
    assert set(got) == set(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    messages = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "what is this ?"}]}]
    assert processor.apply_chat_template(messages) == native.apply_chat_template(messages)

    processor.save_pretrained(tmp_path)
    again = MultimodalProcessor.from_pretrained(tmp_path)
    assert isinstance(again.encoder_processors["audio"], AudioFeaturesWithLengths)
    reloaded = again({"audio": {"audio": natives.waveforms(LENGTHS)}}, {"text": TEXTS}, sampling_rate=tiny.AUDIO_RATE)
    assert torch.equal(reloaded["input_ids"], expected["input_ids"])
    exported = processor.to_hf()
    assert type(exported) is tf.Qwen2AudioProcessor
    for name, value in native_batch(exported, padding_side="right").items():
        assert torch.equal(value, expected[name]), name


def test_compositions_qwen2_audio_cannot_hold_are_refused():
    native = natives.qwen2_audio()
    mllm = MultimodalModel.from_hf(native)
    mllm.audio_encoder.postprocess_projector_callback = None
    with pytest.raises(ValueError, match=r"postprocess_projector_callback is None; Qwen2-Audio masks and trims clips: "
                                         r"TrimAudioFeatures\(\)"):
        mllm.to_hf()
    plain = MultimodalModel({"audio": ModalEncoderModule(tiny.audio_model("qwen2_audio"),
                                                         postprocess_projector_callback=TrimAudioFeatures())},
                            tiny.llm("qwen2"), init_projector_type="mlp")
    with pytest.raises(ValueError, match=r"preprocess_callback is None; Qwen2-Audio masks and trims clips"):
        plain.to_hf()
    with pytest.raises(ValueError, match=r"no layer is unused"):
        MultimodalModel.from_hf(native, drop_unused_layers=True)
    whisper_counts = MultimodalProcessor({"audio": AudioFeaturesWithLengths(tiny.audio_processor())},
                                         natives.tokenizer(), num_feature_calculation_funcs={"audio": len})
    with pytest.raises(ValueError, match=r"audio feature count \(builtin_function_or_method\) is not Qwen2-Audio's"):
        whisper_counts.to_hf()
