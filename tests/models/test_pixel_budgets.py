"""Pixel budgets of the variable-resolution towers: set in the processor config (YAML included), counted exactly by
the data layer, refused when smaller than one patch; samples whose media alone exceed ``max_length`` named."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import transformers as tf
import yaml
from datasets import Dataset
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cornstarch.data import MultimodalDataModule
from cornstarch.data.collator import MultimodalCollator
from cornstarch.data.media import SampleError
from cornstarch.data.raw import sample_lengths
from cornstarch.models.builder import EncoderSpec, PartSpec, ProcessorSpec, build_model_and_processor
from cornstarch.models.multimodal_language_model import ModalEncoderModule, MultimodalModel, MultimodalProcessor
from cornstarch.models.pixel_budgets import check_budget, features_for_size, pixel_budget
from tests import tiny
from tests.models.test_dynamic_resolution import FAMILIES, MERGE, PATCH, copy_of, images, native

BLOCK = (PATCH * MERGE) ** 2  # pixels of one merged Qwen2-VL patch


def budgeted_processor(family: str, budget: dict):
    """The family's PIL image processor with a pixel budget (in the family's own field names)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if family in ("qwen2_vl", "qwen2_5_vl"):
            budget = {"min_pixels": BLOCK, **budget}  # transformers' default (56²) is for 14-pixel patches
            return tf.Qwen2VLImageProcessor(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2, **budget)
        if family == "siglip2":
            return tf.Siglip2ImageProcessor(patch_size=PATCH, **budget)
        return tf.PixtralImageProcessor(patch_size=PATCH, size=budget)


def budgets(family: str):
    """Valid budgets of a family, from one patch (or merge block) up."""
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return st.tuples(st.integers(1, 16), st.integers(1, 64)).map(
            lambda lo_hi: {"min_pixels": BLOCK * min(lo_hi), "max_pixels": BLOCK * max(lo_hi)})
    if family == "siglip2":
        return st.integers(1, 100).map(lambda n: {"max_num_patches": n})
    return st.integers(PATCH, 64).map(lambda n: {"longest_edge": n})


@pytest.fixture(scope="module", params=FAMILIES)
def tower(request):
    """(family, the native features function, a ModalEncoderModule around the same weights, a model around it)."""
    module, features = native(request.param)
    encoder = ModalEncoderModule(copy_of(module), projector=torch.nn.Identity())
    return request.param, features, encoder, MultimodalModel({"vision": encoder}, tiny.llm("llama"))


def processor_for(model: MultimodalModel, image_processor) -> MultimodalProcessor:
    return MultimodalProcessor({"vision": image_processor}, tiny.tokenizer(), model=model,
                               predefined_tokens={"vision": "<image>"})


# ----------------------------------------------------------------------------------------------- counts
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), sizes=st.lists(st.tuples(st.integers(1, 90), st.integers(1, 90)), min_size=1, max_size=3),
       seed=st.integers(0, 2**16))
def test_counts_under_a_budget_equal_the_features_produced(tower, data, sizes, seed):
    family, features, encoder, model = tower
    budget = data.draw(budgets(family))
    sizes = [(h, w) for h, w in sizes if max(h, w) / min(h, w) <= 8]  # elongated images: tested elsewhere
    assume(sizes)
    processor = processor_for(model, budgeted_processor(family, budget))
    if family == "pixtral" and any(vanishes(size, budget["longest_edge"]) for size in sizes):
        with pytest.raises(ValueError):  # the data layer names such an image's sample (test below)
            processor.process_modality("vision", {"images": images(sizes, seed)})
        return
    out, counts = processor.process_modality("vision", {"images": images(sizes, seed)})
    with torch.no_grad():
        per_image = [f.shape[0] for f in features(out)]
        produced = encoder(**out).shape[0]
    assert counts == per_image and sum(counts) == produced
    image_processor = processor.encoder_processors["vision"]
    assert [features_for_size(image_processor, h, w) for h, w in sizes] == counts  # from the sizes alone
    if family == "siglip2":
        assert max(counts) <= budget["max_num_patches"]


def vanishes(size: tuple[int, int], longest_edge: int) -> bool:
    """Whether Pixtral's resize to ``longest_edge`` leaves the image's shorter side no pixel."""
    ratio = max(size) / longest_edge
    return ratio > 1 and int(min(size) / ratio) == 0


def test_an_image_the_budget_shrinks_below_one_pixel_names_its_sample():
    module, _ = native("pixtral")
    model = MultimodalModel({"vision": ModalEncoderModule(module)}, tiny.llm("llama"))
    collate = MultimodalCollator(processor_for(model, budgeted_processor("pixtral", {"longest_edge": 24})))
    fine, thin = ({"prompt": "<image> which digit ?", "answer": "three", "images": images([size])}
                  for size in [(20, 30), (2, 60)])
    assert vanishes((2, 60), 24) and not vanishes((20, 30), 24)
    with pytest.raises(SampleError, match=r"Sample 1, field 'images': the vision processor refuses this item of "
                                          r"60×2 pixels"):
        collate([fine, thin])


@pytest.mark.parametrize("family", FAMILIES)
def test_a_tighter_budget_gives_fewer_features_within_it(family):
    """A 60×80 image under a loose and a tight budget: each within its budget, the tight one smaller."""
    loose, tight = {"qwen2_vl": ({"max_pixels": 80 * BLOCK}, {"max_pixels": 12 * BLOCK}),
                    "siglip2": ({"max_num_patches": 300}, {"max_num_patches": 40}),
                    "pixtral": ({"longest_edge": 80}, {"longest_edge": 24})}[family.replace("qwen2_5_vl", "qwen2_vl")]
    grids = []
    for budget in (loose, tight):
        out = budgeted_processor(family, budget)(images=images([(60, 80)]), return_tensors="pt")
        if family in ("qwen2_vl", "qwen2_5_vl"):
            t, h, w = out["image_grid_thw"][0].tolist()
            assert h * w * PATCH**2 <= budget["max_pixels"]
        elif family == "siglip2":
            h, w = out["spatial_shapes"][0].tolist()
            assert h * w <= budget["max_num_patches"]
        else:
            h, w = (out["image_sizes"][0] // PATCH).tolist()
            assert max(h, w) * PATCH <= budget["longest_edge"]
        grids.append(h * w)
    assert grids[1] < grids[0]


LOOSE_AND_TIGHT = {"qwen2_vl": ({"max_pixels": 64 * BLOCK}, {"max_pixels": 4 * BLOCK}),
                   "qwen2_5_vl": ({"max_pixels": 64 * BLOCK}, {"max_pixels": 4 * BLOCK}),
                   "siglip2": ({"max_num_patches": 200}, {"max_num_patches": 12}),
                   "pixtral": ({"longest_edge": 96}, {"longest_edge": 16})}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_data_layer_measures_each_sample_under_its_budget_from_image_sizes(family):
    """Lengths measured at setup equal the collated ones under each budget, with no image processed but the one
    that tells a fixed-size item's count."""
    module, _ = native(family)
    model = MultimodalModel({"vision": ModalEncoderModule(module)}, tiny.llm("llama"))
    samples = [{"prompt": " ".join(["<image>"] * len(sizes) + ["which digit ?"]), "answer": "three",
                "images": images(sizes, i)} for i, sizes in enumerate([[(90, 70)], [(12, 18), (40, 33)], [(64, 64)]])]
    measured = {}
    for name, budget in zip(("loose", "tight"), LOOSE_AND_TIGHT[family]):
        collate = MultimodalCollator(processor_for(model, budgeted_processor(family, budget)))
        exact = [len(ids) for ids in collate.encode(samples)["input_ids"]]
        calls = []
        process = collate.processor.process_modality
        collate.processor.process_modality = lambda *a, **k: calls.append(a) or process(*a, **k)
        measured[name] = sample_lengths(Dataset.from_list(samples), collate)
        assert measured[name] == exact and len(calls) == 1  # the first image only (remember_item_count)
    assert sum(measured["tight"]) < sum(measured["loose"])


def test_a_per_call_budget_is_measured_and_applied_alike():
    """A budget given per call (the data module's ``processor_kwargs``) rules both the lengths and the batches."""
    module, _ = native("siglip2")
    model = MultimodalModel({"vision": ModalEncoderModule(module)}, tiny.llm("llama"))
    processor = processor_for(model, budgeted_processor("siglip2", {"max_num_patches": 100}))
    samples = [{"prompt": "<image> which digit ?", "answer": "three", "images": images([size], i)}
               for i, size in enumerate([(90, 70), (30, 20)])]
    lengths = {}
    for patches in (100, 12):
        collate = MultimodalCollator(processor, processor_kwargs={"max_num_patches": patches})
        batch = collate(samples)
        assert batch["spatial_shapes"].prod(-1).max() <= patches
        lengths[patches] = sample_lengths(Dataset.from_list(samples), collate)
        assert lengths[patches] == batch["attention_mask"].sum(1).tolist()
    assert sum(lengths[12]) < sum(lengths[100])


def test_an_image_whose_size_does_not_tell_is_processed_and_named():
    """Pixtral cannot resize a 2×60 image into 24 pixels a side: its sample is processed, and named."""
    module, _ = native("pixtral")
    model = MultimodalModel({"vision": ModalEncoderModule(module)}, tiny.llm("llama"))
    collate = MultimodalCollator(processor_for(model, budgeted_processor("pixtral", {"longest_edge": 24})))
    samples = [{"prompt": "<image> which digit ?", "answer": "three", "images": images([size])}
               for size in [(20, 30), (2, 60)]]
    assert features_for_size(collate.processor.encoder_processors["vision"], 2, 60) is None
    with pytest.raises(SampleError, match=r"Sample 1, field 'images': the vision processor refuses this item"):
        sample_lengths(Dataset.from_list(samples), collate)


# ----------------------------------------------------------------------------------------------- configuration
YAML = {  # model.encoders.vision of a config file, as a user writes it
    "qwen2_vl": """
model:
  class_path: transformers.models.qwen2_vl.modeling_qwen2_vl.Qwen2VisionTransformerPretrainedModel
  config: {depth: 1, embed_dim: 32, hidden_size: 48, num_heads: 4, mlp_ratio: 2, patch_size: 4,
           spatial_merge_size: 2, temporal_patch_size: 2}
processor:
  class_path: transformers.Qwen2VLImageProcessor
  kwargs: {patch_size: 4, merge_size: 2, min_pixels: 64, max_pixels: 576}   # 1 to 9 merged patches
""",
    "siglip2": """
model:
  class_path: transformers.Siglip2VisionModel
  config: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 4, patch_size: 4,
           num_patches: 16, vision_use_head: false}
processor:
  class_path: transformers.Siglip2ImageProcessor
  kwargs: {patch_size: 4, max_num_patches: 20}
""",
    "pixtral": """
model:
  class_path: transformers.PixtralVisionModel
  config: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 4, patch_size: 4,
           image_size: 48, head_dim: 8}
processor:
  class_path: transformers.PixtralImageProcessor
  kwargs: {patch_size: 4, size: {longest_edge: 24}}
""",
}
BUDGETS = {"qwen2_vl": {"min_pixels": 64, "max_pixels": 576}, "siglip2": {"max_num_patches": 20},
           "pixtral": {"longest_edge": 24}}
LIMITS = {"qwen2_vl": 9, "siglip2": 20, "pixtral": (24 // PATCH) ** 2}  # features per image the budgets allow


def encoder_spec(family: str, **kwargs) -> EncoderSpec:
    spec = yaml.safe_load(YAML[family])
    spec["processor"]["kwargs"].update(kwargs)
    return EncoderSpec(model=PartSpec(**spec["model"]), processor=ProcessorSpec(**spec["processor"]), token="<image>")


def build(spec: EncoderSpec):
    lm = PartSpec("transformers.LlamaForCausalLM", config=tiny.llm_config("llama").to_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_model_and_processor({"vision": spec}, lm, "tests.tiny:tokenizer")


@pytest.mark.parametrize("family", list(YAML))
def test_a_budget_set_in_yaml_reaches_the_counts(family):
    model, processor = build(encoder_spec(family))
    assert pixel_budget(processor.encoder_processors["vision"]) == BUDGETS[family]
    out, counts = processor.process_modality("vision", {"images": images([(120, 90)])})
    with torch.no_grad():
        assert counts == [model.vision_encoder(**out).shape[0]] and counts[0] <= LIMITS[family]


TOO_SMALL = [
    ("qwen2_vl", {"max_pixels": BLOCK - 1}, rf"max_pixels={BLOCK - 1} is smaller than one merged patch"),
    ("qwen2_vl", {"min_pixels": 8 * BLOCK, "max_pixels": 4 * BLOCK}, r"min_pixels=512 is larger than max_pixels=256"),
    ("siglip2", {"max_num_patches": 0}, r"max_num_patches=0: an image needs at least one patch"),
    ("pixtral", {"longest_edge": PATCH - 1}, rf"size.longest_edge={PATCH - 1} is smaller than one patch"),
]


@pytest.mark.parametrize("family, budget, message", TOO_SMALL, ids=["max_pixels", "min_above_max", "siglip2",
                                                                    "pixtral"])
def test_a_budget_smaller_than_one_patch_is_a_configuration_error(family, budget, message):
    module, _ = native(family)
    model = MultimodalModel({"vision": ModalEncoderModule(module)}, tiny.llm("llama"))
    with pytest.raises(ValueError, match=r"vision processor \(\w+\): " + message):
        processor_for(model, budgeted_processor(family, budget))


def test_a_budget_too_small_in_yaml_or_per_call_names_the_field():
    with pytest.raises(ValueError, match=rf"vision processor .*max_pixels={BLOCK // 2} is smaller than one merged"):
        build(encoder_spec("qwen2_vl", max_pixels=BLOCK // 2))
    module, _ = native("siglip2")
    model = MultimodalModel({"vision": ModalEncoderModule(module)}, tiny.llm("llama"))
    processor = processor_for(model, budgeted_processor("siglip2", {"max_num_patches": 16}))
    with pytest.raises(ValueError, match=r"max_num_patches=0: an image needs at least one patch"):
        MultimodalCollator(processor, processor_kwargs={"max_num_patches": 0})


def test_a_processor_whose_patches_are_not_the_towers_is_refused():
    module, _ = native("qwen2_vl")
    model = MultimodalModel({"vision": ModalEncoderModule(module)}, tiny.llm("llama"))
    with pytest.raises(ValueError, match=r"patch_size=14 but the tower's config has patch_size=4"):
        processor_for(model, tf.Qwen2VLImageProcessor(merge_size=MERGE))  # transformers' default patch_size 14
    with pytest.raises(ValueError, match=r"merge_size=1 but the tower's config has spatial_merge_size=2"):
        processor_for(model, tf.Qwen2VLImageProcessor(patch_size=PATCH, merge_size=1))
    assert check_budget("vision", tf.CLIPImageProcessor(), tiny.vision_config("clip")) is None  # no budget: unchecked


# ----------------------------------------------------------------------------------------------- max_length
@pytest.fixture(scope="module")
def qwen_processor():
    module, _ = native("qwen2_vl")
    model = MultimodalModel({"vision": ModalEncoderModule(module)}, tiny.llm("llama"))
    return processor_for(model, budgeted_processor("qwen2_vl", {"max_pixels": 64 * BLOCK}))


def long_media_samples():
    """Sample 2's image alone yields 64 features (a 128×128 image at 64 merged patches); the others fit in 40."""
    sizes = [(16, 16), (24, 16), (128, 128), (16, 24)]
    return [{"prompt": "<image> which digit ?", "answer": "three", "images": images([size], i)}
            for i, size in enumerate(sizes)]


@pytest.mark.parametrize("preprocess", [True, False], ids=["encoded", "raw"])
def test_a_sample_whose_media_alone_exceed_max_length_is_named(qwen_processor, preprocess):
    data = MultimodalDataModule(train=Dataset.from_list(long_media_samples()), processor=qwen_processor,
                                batch_size=2, max_length=40, preprocess=preprocess, group_by_length=True)
    with pytest.raises(SampleError, match=r"Sample 2, field 'images': its media alone take 64 tokens \(vision 64\), "
                                          r"more than max_length=40"):
        data.setup()


@pytest.mark.parametrize("preprocess", [True, False], ids=["encoded", "raw"])
def test_or_skipped_and_counted(qwen_processor, preprocess, caplog):
    data = MultimodalDataModule(train=Dataset.from_list(long_media_samples()), processor=qwen_processor,
                                batch_size=2, max_length=40, preprocess=preprocess, on_too_long="skip")
    with caplog.at_level(logging.WARNING):
        data.setup()
    assert data.skipped["train"] == 1 and len(data.datasets["train"]) == 3
    assert "skipped 1 of 4 samples longer than max_length=40; the first: Sample 2, field 'images': its media " \
           "alone take 64 tokens" in caplog.text
    assert sum(batch["input_ids"].shape[0] for batch in data.train_dataloader()) == 3
