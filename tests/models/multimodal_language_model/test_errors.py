"""Bad input gets a clear ValueError naming what is wrong."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cornstarch.models.multimodal_language_model import (
    ModalEncoderModule,
    MultimodalModel,
    MultimodalProjector,
    MultimodalProjectorConfig,
)
from tests import tiny

TOKEN = tiny.VOCAB + 3  # outside the LM vocabulary on purpose


def clip_llama(**encoder_kwargs) -> MultimodalModel:
    torch.manual_seed(0)
    mllm = MultimodalModel({"vision": ModalEncoderModule(tiny.vision_model("clip"), **encoder_kwargs)},
                           tiny.llm("llama"))
    return mllm


def test_count_mismatch_names_modality_tokens_and_features():
    mllm = clip_llama()
    mllm.set_modality_token_ids({"vision": TOKEN})
    ids, mask = tiny.batch_with_placeholders([[(TOKEN, 17)], [(TOKEN, 16)]], seq_len=40)
    with pytest.raises(ValueError, match=r"'vision'.*33 vision token\(s\).*34 feature vector\(s\)"):
        mllm(input_ids=ids, attention_mask=mask, pixel_values=tiny.pixels(2))


def test_tokens_without_any_modality_input():
    mllm = clip_llama()
    mllm.set_modality_token_ids({"vision": TOKEN})
    ids, mask = tiny.batch_with_placeholders([[(TOKEN, 17)]], seq_len=24)
    with pytest.raises(ValueError, match=r"'vision'.*17 vision token\(s\).*0 feature"):
        mllm(input_ids=ids, attention_mask=mask)


def test_modality_without_token_id():
    mllm = clip_llama()
    ids, mask = tiny.batch_with_placeholders([[(TOKEN, 17)]], seq_len=24)
    with pytest.raises(ValueError, match=r"'vision' has inputs but no token id.*set_modality_token_ids"):
        mllm(input_ids=ids, attention_mask=mask, pixel_values=tiny.pixels(1))


def test_token_id_for_unknown_modality():
    with pytest.raises(ValueError, match=r"No encoder for modality \['audio'\]"):
        clip_llama().set_modality_token_ids({"audio": 5})


def test_encoder_value_must_be_modal_encoder_module():
    with pytest.raises(ValueError, match=r"encoders\['vision'\] is a CLIPVisionModel; wrap it"):
        MultimodalModel({"vision": tiny.vision_model("clip")}, tiny.llm("llama"))


def test_encoder_key_must_be_identifier():
    with pytest.raises(ValueError, match="must be a Python identifier"):
        MultimodalModel({"my vision": ModalEncoderModule(tiny.vision_model("clip"))}, tiny.llm("llama"))


def test_modal_encoder_module_needs_a_module():
    with pytest.raises(ValueError, match="needs an encoder nn.Module"):
        ModalEncoderModule()
    clip = tiny.vision_model("clip")
    with pytest.raises(ValueError, match="both model= and module="):
        ModalEncoderModule(clip, module=tiny.vision_model("clip"))


@pytest.mark.parametrize("in_features,out_features,message", [
    (32, 48, r"vision projector outputs 48 features but the language model's embeddings are 64 wide"),
    (40, 64, r"vision projector takes 40 features but the vision encoder outputs 32"),
])
def test_given_projector_must_fit(in_features, out_features, message):
    projector = MultimodalProjector(MultimodalProjectorConfig(in_features=in_features, out_features=out_features))
    with pytest.raises(ValueError, match=message):
        clip_llama(projector=projector)


def test_custom_projection_with_wrong_width_fails_at_merge():
    projector = MultimodalProjector(MultimodalProjectorConfig(), projection=nn.Linear(32, 50))
    mllm = clip_llama(projector=projector)
    mllm.set_modality_token_ids({"vision": TOKEN})
    ids, mask = tiny.batch_with_placeholders([[(TOKEN, 17)]], seq_len=24)
    with pytest.raises(ValueError, match=r"'vision': features have width 50 but .* width 64"):
        mllm(input_ids=ids, attention_mask=mask, pixel_values=tiny.pixels(1))


def test_unknown_key_in_train_encoders_mode():
    mllm = clip_llama()
    with pytest.raises(ValueError, match=r"names 'audio', which is no encoder; encoders: \['vision'\]"):
        mllm.train(encoders_mode={"audio": (False, True)})
    with pytest.raises(ValueError, match=r"must be \(module_trains: bool, projector_trains: bool\)"):
        mllm.train(encoders_mode={"vision": False})


@pytest.mark.parametrize("kwargs,message", [
    (dict(projection_type="conv"), r"Unknown projection_type 'conv'; valid types: linear, mlp"),
    (dict(activation="swishy"), r"Unknown activation 'swishy'; valid activations .*gelu"),
])
def test_bad_projector_type_or_activation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultimodalProjectorConfig(in_features=4, out_features=4, **kwargs)
    init = {"init_projector_type": kwargs.get("projection_type", "linear"),
            "init_activation": kwargs.get("activation", "gelu")}
    with pytest.raises(ValueError, match=message):
        MultimodalModel({"vision": ModalEncoderModule(tiny.vision_model("clip"))}, tiny.llm("llama"), **init)


def test_projector_without_sizes():
    with pytest.raises(ValueError, match="needs integer in_features and out_features"):
        MultimodalProjector(MultimodalProjectorConfig())


def test_ambiguous_input_between_two_vision_towers_and_explicit_form():
    torch.manual_seed(0)
    mllm = MultimodalModel(
        {"clip": ModalEncoderModule(tiny.vision_model("clip")), "siglip": ModalEncoderModule(tiny.vision_model("siglip"))},
        tiny.llm("llama"),
    )
    mllm.set_modality_token_ids({"clip": TOKEN, "siglip": TOKEN + 1})
    ids, mask = tiny.batch_with_placeholders([[(TOKEN, 17), (TOKEN + 1, 16)]], seq_len=48)
    with pytest.raises(ValueError, match=r"'pixel_values' is accepted by several encoders \(\['clip', 'siglip'\]\)"):
        mllm(input_ids=ids, attention_mask=mask, pixel_values=tiny.pixels(1))
    out = mllm(input_ids=ids, attention_mask=mask,
               encoder_inputs={"clip": {"pixel_values": tiny.pixels(1)}, "siglip": {"pixel_values": tiny.pixels(1, 1)}})
    assert out.logits.shape == (1, 48, tiny.VOCAB)
    with pytest.raises(ValueError, match=r"encoder_inputs names 'audio', which is no encoder"):
        mllm(input_ids=ids, attention_mask=mask, encoder_inputs={"audio": {}})


def test_unknown_keyword_is_refused_not_ignored():
    mllm = clip_llama()
    mllm.set_modality_token_ids({"vision": TOKEN})
    ids, mask = tiny.batch_with_placeholders([[(TOKEN, 17)]], seq_len=24)
    with pytest.raises(ValueError, match=r"Unknown input\(s\) \['pixel_value'\].*encoder_inputs"):
        mllm(input_ids=ids, attention_mask=mask, pixel_values=tiny.pixels(1), pixel_value=tiny.pixels(1))
    out = mllm(input_ids=ids, attention_mask=mask, pixel_values=tiny.pixels(1), output_hidden_states=True, use_cache=False)
    assert out.hidden_states is not None
