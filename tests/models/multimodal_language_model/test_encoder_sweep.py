"""Every vision and audio model class in transformers, as a modality encoder of a tiny Llama: its features
``[items, tokens, hidden]`` reach the LM, the processor knows how many there are per item, and it trains; or it is
refused with a clear message.

The candidates are the base models of ``MODEL_FOR_IMAGE_MAPPING_NAMES`` plus the ``*_vision_model`` types (vision),
and of the CTC / audio-classification / x-vector / audio-frame-classification registries plus the ``*_audio*``
types (audio). Each is built tiny from its config (``tests/sweep.py``); an encoder-decoder is refused, and then its
encoder (``get_encoder()``) is what is swept. The feature count comes from ``FeatureCounter`` (built in, or measured
by running one item once per input shape) and must equal what the encoder produces; one training step must give
the projector and the encoder gradients. The coverage is printed at the end of the test session.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers
from transformers.models.auto import modeling_auto as registry

from cornstarch.models.feature_counts import FeatureCounter
from cornstarch.models.multimodal_language_model import ModalEncoderModule, MultimodalModel
from tests import sweep, tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread is fastest

_BASE = registry.MODEL_MAPPING_NAMES
CLASS_OF = {**_BASE, **registry.MODEL_FOR_IMAGE_MAPPING_NAMES}  # the image registry names vision sub-models
VISION = sorted(set(registry.MODEL_FOR_IMAGE_MAPPING_NAMES)
                | {m for m in _BASE if m.endswith(("_vision_model", "_vision_encoder"))})
AUDIO = sorted({m for mapping in (registry.MODEL_FOR_CTC_MAPPING_NAMES, registry.MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES,
                                  registry.MODEL_FOR_AUDIO_XVECTOR_MAPPING_NAMES,
                                  registry.MODEL_FOR_AUDIO_FRAME_CLASSIFICATION_MAPPING_NAMES) for m in mapping
                if m in _BASE} | {m for m in _BASE if m.endswith(("audio_encoder", "_audio"))})
TOKEN = tiny.VOCAB + 7
SAMPLES = 16000  # raw audio samples per item: ~50 frames, enough for the SpecAugment masks of training mode


def item_inputs(module: torch.nn.Module, n: int) -> dict[str, torch.Tensor]:
    """``n`` random items of the shape the encoder's config asks for, under its forward's argument name."""
    config = module.config
    names = inspect.signature(module.forward).parameters
    g = torch.Generator().manual_seed(0)
    if "spatial_shapes" in names:  # NaFlex (SigLIP2): patches [n, 16, channels * patch²], their mask and grid
        patch = config.patch_size
        return {"pixel_values": torch.randn(n, 16, config.num_channels * patch * patch, generator=g),
                "pixel_attention_mask": torch.ones(n, 16, dtype=torch.long),
                "spatial_shapes": torch.tensor([[4, 4]] * n)}
    video = "pixel_values_videos" if "pixel_values_videos" in names else None
    if "pixel_values" in names or video:
        size = getattr(config, "image_size", 32) or 32
        h, w = size if isinstance(size, (list, tuple)) else (size, size)
        shape = (n, getattr(config, "num_channels", 3), h, w)
        frames = getattr(config, "num_frames", None) or (8 if video else None)
        if frames:  # video towers: [n, frames, channels, h, w]
            shape = (n, frames, *shape[1:])
        return {video or "pixel_values": torch.randn(shape, generator=g)}
    if "audio_mel" in names:  # [n, frames, mel] and its padding mask
        mel = config.input_feat_size
        return {"audio_mel": torch.randn(n, 64, mel, generator=g), "audio_mel_mask": torch.zeros(n, 64, dtype=torch.bool)}
    if "input_features" in names:
        mel = getattr(config, "num_mel_bins", None) or getattr(config, "feature_size", 16)
        stacked = getattr(config, "feature_projection_input_dim", None)  # wav2vec2-BERT: 2 frames stacked
        positions = getattr(config, "max_source_positions", None)
        if positions and not stacked:  # Whisper-style: [n, mel, 2 * max_source_positions]
            return {"input_features": torch.randn(n, mel, 2 * positions, generator=g)}
        return {"input_features": torch.randn(n, 64, stacked or mel, generator=g)}  # [n, frames, features]
    if "input_values" in names:
        if getattr(config, "num_mel_bins", None) and getattr(config, "max_length", None):  # spectrogram (AST)
            return {"input_values": torch.randn(n, config.max_length, config.num_mel_bins, generator=g)}
        return {"input_values": torch.randn(n, SAMPLES, generator=g)}  # raw audio
    raise ValueError(f"no known input among {sorted(names)}")


def registry_model(model_type: str) -> torch.nn.Module:
    """The registry's class for ``model_type``, built from its tiny config (or the sub-config of its class, for a
    composite config such as a VLM's whose vision model the image registry names)."""
    cls = getattr(transformers, CLASS_OF[model_type])
    config = sweep.tiny_config(model_type)
    if not isinstance(config, cls.config_class):
        subs = [getattr(config, k) for k in config.to_dict() if isinstance(getattr(config, k, None), cls.config_class)]
        config = subs[0] if subs else config
    return cls._from_config(config)


def llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny.llm("llama").train()


def sweep_encoder(model_type: str, modality: str) -> None:
    name = "vision" if modality == "vision" else "audio"
    if model_type in sweep.ENCODERS_NOT_BUILT:
        sweep.RESULTS[modality][model_type] = ("not built", sweep.ENCODERS_NOT_BUILT[model_type])
        pytest.skip(sweep.ENCODERS_NOT_BUILT[model_type])
    torch.manual_seed(0)
    encoder = registry_model(model_type)
    note = ""
    if getattr(encoder.config, "is_encoder_decoder", False):
        with pytest.raises(ValueError, match=type(encoder).__name__):
            ModalEncoderModule(encoder)
        encoder, note = encoder.get_encoder(), " (its encoder)"
    try:
        module = ModalEncoderModule(encoder)
        mllm = MultimodalModel({name: module}, llama())
    except ValueError as err:
        assert type(encoder).__name__ in str(err), err
        sweep.RESULTS[modality][model_type] = ("refused", str(err))
        return
    mllm.set_modality_token_ids({name: TOKEN})
    inputs = item_inputs(encoder, 2)
    counter = FeatureCounter(encoder.config, [], encoder=module)
    counts = counter({}, inputs)
    features = module(**inputs)
    assert features.shape == (sum(counts), 64), (features.shape, counts)

    ids, mask = tiny.batch_with_placeholders([[(TOKEN, counts[0])], [(TOKEN, counts[1])]], seq_len=sum(counts) + 12)
    labels = ids.masked_fill((mask == 0) | (ids == TOKEN), -100)
    out = mllm(input_ids=ids, attention_mask=mask, labels=labels, **inputs)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None and p.grad.any() for p in module.projector.parameters())
    assert any(p.grad is not None and p.grad.any() for p in encoder.parameters())
    how = "measured" if counter.measured else "built in"
    sweep.RESULTS[modality][model_type] = ("pass", f"{type(encoder).__name__}{note}: {counts[0]} features, {how}")


@pytest.mark.parametrize("model_type", VISION)
def test_vision_encoder(model_type):
    sweep_encoder(model_type, "vision")


@pytest.mark.parametrize("model_type", AUDIO)
def test_audio_encoder(model_type):
    sweep_encoder(model_type, "audio")
