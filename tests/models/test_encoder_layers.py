"""feature_layer: encoders truncated after the selected layer give that layer's features, for every family."""

from __future__ import annotations

import copy

import pytest
import torch

from cornstarch.models.encoder_layers import layer_stack, truncate_after
from cornstarch.models.multimodal_language_model import ModalEncoderModule, MultimodalProjector, \
    MultimodalProjectorConfig
from tests import tiny

VISION = ["clip", "siglip", "vit", "dinov2"]


def encoder_and_inputs(family: str):
    if family in VISION:
        return tiny.vision_model(family), {"pixel_values": tiny.pixels(2)}
    return tiny.audio_model(family), {"input_features": tiny.audio_features(2)}


def add_layer(model):
    """Give the tiny encoder a third layer so that -2 is a real inner layer."""
    path, layers = layer_stack(model)
    layers.append(copy.deepcopy(layers[-1]))
    for field in ("num_hidden_layers", "encoder_layers"):
        if getattr(model.config, field, None) == 2:
            setattr(model.config, field, 3)
            break
    return model


@pytest.mark.parametrize("family", VISION + ["whisper"])
@pytest.mark.parametrize("feature_layer", [-2, -3])
def test_truncated_encoder_yields_the_selected_hidden_states(family, feature_layer):
    full, inputs = encoder_and_inputs(family)
    full = add_layer(full)
    expected = full(**inputs, output_hidden_states=True).hidden_states[feature_layer]  # HF's own indexing
    encoder = ModalEncoderModule(copy.deepcopy(full), feature_layer=feature_layer, projector=MultimodalProjector(
        MultimodalProjectorConfig(in_features=32, out_features=32), projection=torch.nn.Identity()))
    _, layers = layer_stack(encoder.module)
    assert len(layers) == 3 + feature_layer + 1
    assert encoder.feature_layer == -1  # what the truncated encoder now means (and saves)
    torch.testing.assert_close(encoder(**inputs), expected.reshape(-1, 32), atol=0, rtol=0)


def test_feature_layer_does_not_touch_a_shared_config():
    clip = tiny.vision_model("clip")
    other = type(clip)(clip.config)  # shares the config object
    truncate_after(clip, -2)
    assert clip.config.num_hidden_layers == 1 and other.config.num_hidden_layers == 2


@pytest.mark.parametrize("bad", [0, 1, -3, 1.5])
def test_feature_layer_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match=r"feature_layer must be an int in \[-2, -1\]"):
        ModalEncoderModule(tiny.vision_model("clip"), feature_layer=bad)


def test_encoder_pooling_after_its_layers_is_refused():
    with pytest.raises(ValueError, match="pools after its layers"):
        ModalEncoderModule(tiny.audio_model("qwen2_audio"), feature_layer=-2)
