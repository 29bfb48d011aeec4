"""Qwen2-Audio (``Qwen2AudioForConditionalGeneration``, ``Qwen2AudioProcessor``) ↔ :class:`MultimodalModel` /
:class:`MultimodalProcessor`.

A Qwen2-Audio is one audio encoder (``"audio"``, a ``Qwen2AudioEncoder``) that masks each clip's padded frames
and keeps each clip's real features (:mod:`cornstarch.models.audio_lengths`), a linear projector and a causal LM.
"""

from __future__ import annotations

from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor

from ..audio_lengths import AudioAttentionMask, AudioFeaturesWithLengths, TrimAudioFeatures
from ..multimodal_language_model import ModalEncoderModule, MultimodalModel, MultimodalProcessor
from .common import (assemble, decoder_and_head, multimodal_model, projector_layers, projector_of, the_encoder,
                     token_in_vocabulary)
from .llava import chat_ready_tokenizer, single_processor

NATIVE = Qwen2AudioForConditionalGeneration
PROCESSOR = Qwen2AudioProcessor
KEY = "audio"
ENCODER_TYPE = "qwen2_audio_encoder"


class Qwen2AudioCount:
    """Audio features per clip as ``Qwen2AudioProcessor`` counts them, from ``feature_attention_mask``.

    A count function for :class:`MultimodalProcessor` (``num_feature_calculation_funcs``).

    >>> import torch
    >>> Qwen2AudioCount()({}, {"feature_attention_mask": torch.tensor([[1] * 32, [1] * 12 + [0] * 20])})
    [8, 3]
    """

    def get_config(self) -> dict:
        return {}

    def __call__(self, inputs: dict, outputs: dict) -> list[int]:
        return TrimAudioFeatures().recount_features([], outputs)


# ----------------------------------------------------------------------------------------------- model
def import_model(native: Qwen2AudioForConditionalGeneration, drop_unused_layers: bool = False) -> MultimodalModel:
    """A :class:`MultimodalModel` holding a Qwen2-Audio's modules (shared, not copied).

    Raises:
        ValueError: for ``drop_unused_layers`` (the encoder's last output is used: no layer is unused).
    """
    if drop_unused_layers:
        raise ValueError("Qwen2-Audio uses its encoder's last output: no layer is unused (drop_unused_layers).")
    inner = native.model
    encoder = ModalEncoderModule(inner.audio_tower, projector=projector_of([inner.multi_modal_projector.linear]),
                                 preprocess_callback=AudioAttentionMask(),
                                 postprocess_projector_callback=TrimAudioFeatures())
    return multimodal_model(native, KEY, encoder, native.config.audio_token_id)


def export_model(mllm: MultimodalModel) -> Qwen2AudioForConditionalGeneration:
    """The ``Qwen2AudioForConditionalGeneration`` holding the model's modules (shared, not copied).

    Raises:
        ValueError: naming the part with no Qwen2-Audio equivalent.
    """
    key, encoder, tower = the_encoder(mllm, "Qwen2-Audio")
    expected = {"preprocess_callback": AudioAttentionMask, "postprocess_module_callback": type(None),
                "postprocess_projector_callback": TrimAudioFeatures}
    for name, kind in expected.items():
        if not isinstance(getattr(encoder, name), kind):
            raise ValueError(f"The {key} encoder's {name} is {getattr(encoder, name)!r}; Qwen2-Audio "
                             f"{'has none' if kind is type(None) else 'masks and trims clips: ' + kind.__name__ + '()'}.")
    (linear,), _ = projector_layers(encoder, key, "linear", "Qwen2-Audio")
    decoder, head = decoder_and_head(mllm.language_model, "Qwen2-Audio")
    config = Qwen2AudioConfig(audio_config=tower.config, text_config=mllm.language_model.config,
                              audio_token_index=token_in_vocabulary(mllm, key, "Qwen2-Audio"))
    parts = {"model.audio_tower": tower, "model.multi_modal_projector.linear": linear,
             "model.language_model": decoder, "lm_head": head}
    return assemble(NATIVE, config, parts, mllm.language_model.generation_config)


def claims_model(mllm: MultimodalModel) -> bool:
    """Whether the model's one encoder is a Qwen2-Audio encoder."""
    module = next(iter(mllm.encoders.values())).module
    return len(mllm.encoders) == 1 and getattr(module.config, "model_type", None) == ENCODER_TYPE


# ----------------------------------------------------------------------------------------------- processor
def import_processor(native: Qwen2AudioProcessor, model: MultimodalModel | None = None) -> MultimodalProcessor:
    """A :class:`MultimodalProcessor` giving a ``Qwen2AudioProcessor``'s ``input_ids``, ``input_features`` and
    ``feature_attention_mask`` (audio given as ``{"audio": [...], "sampling_rate": ...}``)."""
    return MultimodalProcessor({KEY: AudioFeaturesWithLengths(native.feature_extractor)}, chat_ready_tokenizer(native),
                               model=model, num_feature_calculation_funcs={KEY: Qwen2AudioCount()},
                               predefined_tokens={KEY: native.audio_token})


def export_processor(processor: MultimodalProcessor) -> Qwen2AudioProcessor:
    """The ``Qwen2AudioProcessor`` giving the same inputs.

    Raises:
        ValueError: for several encoder processors or an audio count other than Qwen2-Audio's.
    """
    key = single_processor(processor, "Qwen2AudioProcessor")
    if not isinstance(processor.counters.get(key), Qwen2AudioCount):
        raise ValueError(f"The {key} feature count ({type(processor.counters.get(key)).__name__}) is not "
                         "Qwen2-Audio's (Qwen2AudioCount, from feature_attention_mask).")
    tokenizer = processor.tokenizer
    return Qwen2AudioProcessor(feature_extractor=processor.encoder_processors[key].feature_extractor,
                               tokenizer=tokenizer, chat_template=tokenizer.chat_template,
                               audio_token=processor.tokens[key])


def claims_processor(processor: MultimodalProcessor) -> bool:
    """Whether the processor's one encoder processor is an :class:`AudioFeaturesWithLengths`."""
    return len(processor.encoder_processors) == 1 and isinstance(
        next(iter(processor.encoder_processors.values())), AudioFeaturesWithLengths)
