"""Whatever ``save_pretrained`` writes loads back exactly, and a damaged or wrong directory is a clear error."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

from cornstarch.models.multimodal_language_model import ModalEncoderModule, MultimodalModel
from tests import tiny


def _model(vision: torch.nn.Module) -> MultimodalModel:
    return MultimodalModel({"vision": ModalEncoderModule(vision)}, tiny.llm("llama"))


@pytest.fixture
def saved(tmp_path):
    model = _model(tiny.vision_model("clip"))
    model.save_pretrained(tmp_path / "m")
    return model, tmp_path / "m"


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_part_built_with_a_constructor_flag_round_trips(tmp_path):
    model = _model(tf.ViTModel(tiny.vision_config("vit"), add_pooling_layer=False))
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["encoders"]["vision"]["init_kwargs"] == {"add_pooling_layer": False}
    assert _same(model, MultimodalModel.from_pretrained(tmp_path / "m"))


def test_part_that_cannot_be_rebuilt_is_refused_before_writing(tmp_path):
    vision = tiny.vision_model("clip")
    vision.extra = torch.nn.Linear(2, 2)  # a module its class and config do not build
    with pytest.raises(ValueError, match="CLIPVisionModel has parameters that CLIPVisionModel\\(config\\) does not"):
        _model(vision).save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_bit_flip_in_the_weights_is_detected(saved):
    model, path = saved
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors.*does not match the SHA-256"):
        MultimodalModel.from_pretrained(path)
    assert not _same(model, MultimodalModel.from_pretrained(path, verify_weights=False))  # the opt-out loads it


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="'.*nope' is not a directory"):
        MultimodalModel.from_pretrained(tmp_path / "nope")


def test_directory_without_config_is_named(saved):
    _, path = saved
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json' does not exist"):
        MultimodalModel.from_pretrained(path)


def test_directory_with_a_foreign_config_is_named(saved):
    _, path = saved
    (path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ValueError, match="config.json' is not a MultimodalModel config"):
        MultimodalModel.from_pretrained(path)


def test_directory_without_weights_is_named(saved):
    _, path = saved
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors' does not exist"):
        MultimodalModel.from_pretrained(path)
