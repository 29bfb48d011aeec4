"""Llava-Next's anyres in cornstarch (cornstarch.models.anyres) and its import/export: images of different sizes in
one batch give LlavaNextForConditionalGeneration's logits (1e-5) and greedy tokens, for CLIP and SigLIP towers and
any LM; the learned image_newline trains, saves and loads with the model; the processor expands each image to the
features the model produces for it (a property over random sizes)."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from cornstarch.models import MultimodalModel, MultimodalProcessor
from cornstarch.models.anyres import AnyresTiles, PackImageFeatures, anyres_encoder
from cornstarch.models.hf.llava_next import LlavaNextImageCount
from tests import tiny
from tests.models.hf import natives
from tests.models.hf.natives import PINPOINTS, max_difference

TEXTS = ["USER : <image> what is this ?", "hello <image> world", "describe the picture"]
SIZES = [(40, 90), (70, 30)]  # 1x3 and 2x1 grids: 4 and 3 tiles (the second padded to 4 in pixel_values)
TOWERS = {"clip": (-2, "default"), "siglip": (-1, "full")}  # SigLIP has no CLS: every token is a patch


def native_batch(processor, padding_side="left"):
    return processor(images=natives.images(SIZES), text=TEXTS, return_tensors="pt", padding=True,
                     padding_side=padding_side)


@pytest.mark.parametrize("tower", list(TOWERS))
def test_imported_llava_next_gives_native_logits_and_tokens(tower):
    layer, strategy = TOWERS[tower]
    native = natives.llava_next(layer, strategy, tower)
    batch = native_batch(natives.llava_next_processor(strategy, tower))
    assert batch["pixel_values"].shape[:2] == (2, 4) and batch["image_sizes"].tolist() == [list(s) for s in SIZES]
    mllm = MultimodalModel.from_hf(native).eval()
    assert mllm.component_names() == ["vision.module", "vision.projector", "language_model"]
    assert mllm.vision_encoder.postprocess_projector_callback.image_newline is native.model.image_newline
    natives.assert_like_native(mllm, native, batch)


def test_export_of_the_import_is_the_native_model(tmp_path):
    native = natives.llava_next(seed=1)
    native.save_pretrained(tmp_path)
    exported = MultimodalModel.from_hf(tmp_path).to_hf()
    assert type(exported) is tf.LlavaNextForConditionalGeneration
    expected, got = native.state_dict(), exported.state_dict()
    assert sorted(got) == sorted(expected) and "model.image_newline" in got
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    assert exported.config.image_grid_pinpoints == PINPOINTS


@pytest.mark.parametrize("tower,lm", [("clip", "mistral"), ("siglip", "qwen2")])
def test_composed_anyres_model_is_llava_next(tower, lm, tmp_path):
    """Any tower the reference names and any LM: the composed model equals the Llava-Next it exports to; its
    newline trains with the projector and is saved and loaded with the model."""
    layer, strategy = TOWERS[tower]
    torch.manual_seed(0)
    language_model = tiny.llm(lm)
    vision = anyres_encoder(tiny.vision_model(tower), language_model.config.hidden_size, PINPOINTS, layer, strategy)
    mllm = MultimodalModel({"vision": vision}, language_model, init_projector_type="mlp").eval()
    processor = MultimodalProcessor({"vision": natives.llava_next_processor(strategy, tower).image_processor},
                                    natives.tokenizer(natives.IMAGE_TOKEN), model=mllm,
                                    predefined_tokens={"vision": natives.IMAGE_TOKEN})
    batch = processor({"vision": {"images": natives.images(SIZES)}}, {"text": TEXTS, "padding_side": "left"})
    native = mllm.to_hf().eval()
    assert type(native) is tf.LlavaNextForConditionalGeneration
    with torch.no_grad():
        expected = native(**batch).logits
        assert max_difference(mllm(**batch).logits, expected) <= 1e-5
    assert torch.equal(native_batch(processor.to_hf())["input_ids"], batch["input_ids"])

    newline = vision.postprocess_projector_callback.image_newline
    assert mllm.set_trainable_components(["vision.projector"])["vision.projector"] and newline.requires_grad
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    mllm.train()(**batch, labels=labels).loss.backward()
    assert newline.grad is not None and newline.grad.abs().sum() > 0
    with torch.no_grad():
        newline.add_(1.0)  # a trained newline is the model's
    mllm.save_pretrained(tmp_path)
    again = MultimodalModel.from_pretrained(tmp_path).eval()
    assert torch.equal(again.vision_encoder.postprocess_projector_callback.image_newline, newline)
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, mllm.eval()(**batch).logits)


def test_processor_gives_the_native_inputs(tmp_path):
    native = natives.llava_next_processor()
    processor = MultimodalProcessor.from_hf(native)
    expected = native_batch(native, padding_side="right")
    got = processor({"vision": {"images": natives.images(SIZES)}}, {"text": TEXTS})
    assert set(got) == set(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    processor.save_pretrained(tmp_path)
    again = MultimodalProcessor.from_pretrained(tmp_path)
    assert isinstance(again.counters["vision"], LlavaNextImageCount)
    assert torch.equal(again({"vision": {"images": natives.images(SIZES)}}, {"text": TEXTS})["input_ids"],
                       expected["input_ids"])
    exported = processor.to_hf()
    assert type(exported) is tf.LlavaNextProcessor
    for name, value in native_batch(exported, padding_side="right").items():
        assert torch.equal(value, expected[name]), name


@pytest.fixture(scope="module")
def counted():
    """The native model, the cornstarch model and both processors' counts (the native's and the model's)."""
    native = natives.llava_next()
    model = MultimodalModel.from_hf(natives.llava_next()).eval()
    image_processor = natives.llava_next_processor().image_processor
    counts = {"native processor's": LlavaNextImageCount(tiny.PATCH, 1, "default", PINPOINTS),
              "model's": MultimodalProcessor({"vision": image_processor}, natives.tokenizer(), model=model).counters[
                  "vision"]}
    return native, model, image_processor, counts


@settings(max_examples=10, deadline=None)
@given(sizes=st.lists(st.tuples(st.integers(4, 160), st.integers(4, 160)), min_size=2, max_size=2))
def test_counts_equal_the_features_for_any_image_sizes(counted, sizes):
    """Two random sizes per batch, 10 batches: the counts of both processors equal the features per image that
    the cornstarch model and the native one produce."""
    native, model, image_processor, counts = counted
    outputs = dict(image_processor(natives.images(sizes), return_tensors="pt"))
    with torch.no_grad():
        features = model.vision_encoder(**outputs)  # [all images' features, hidden]
        per_image = [f.shape[0] for f in native.model.get_image_features(
            outputs["pixel_values"], outputs["image_sizes"]).pooler_output]
    assert features.shape[0] == sum(per_image)
    for name, count in counts.items():
        assert count({}, outputs) == per_image, name


def test_anyres_refusals_name_the_problem():
    mllm = MultimodalModel.from_hf(natives.llava_next())
    tiles = mllm.vision_encoder.preprocess_callback
    with pytest.raises(ValueError, match=r"need image_sizes"):
        tiles({"pixel_values": torch.zeros(1, 3, 3, 32, 32)})
    with pytest.raises(ValueError, match=r"17 features each, .* 4x4 grid; drop the CLS token"):
        mllm.vision_encoder.postprocess_projector_callback({"image_sizes": [[40, 90]]}, torch.zeros(4, 17, 64))
    mllm.vision_encoder.preprocess_callback = AnyresTiles(PINPOINTS, tile_size=64)
    with pytest.raises(ValueError, match=r"anyres callbacks disagree with its tower or each other \(tile_size"):
        mllm.to_hf()
    mllm.vision_encoder.preprocess_callback = tiles
    mllm.vision_encoder.postprocess_projector_callback = PackImageFeatures(64, [[32, 32]], 32, 8)
    with pytest.raises(ValueError, match=r"disagree with its tower or each other \(image_grid_pinpoints\)"):
        mllm.to_hf()
