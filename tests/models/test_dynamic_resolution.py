"""Variable-resolution vision towers (Qwen2-VL, Qwen2.5-VL, SigLIP2 NaFlex, Pixtral): fed their processor's outputs,
features equal to transformers' own, counts equal to the features, and mixed-size batches that train like their
samples alone (packed and unpacked)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import transformers as tf
from datasets import Dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cornstarch.data import MultimodalDataModule
from cornstarch.data.collator import MultimodalCollator
from cornstarch.data.encoded import EncodedCollate, EncodedDataset, encode_split
from cornstarch.data.media import SampleError
from cornstarch.data.packing import pack_batch
from cornstarch.data.raw import sample_lengths
from cornstarch.models.multimodal_language_model import ModalEncoderModule, MultimodalModel, MultimodalProcessor
from cornstarch.models.multimodal_language_model.supervised_loss import next_token_targets, per_sample_loss
from tests import tiny

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "siglip2", "pixtral")
PATCH = 4
MERGE = 2
_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, patch_size=PATCH)


def tower_config(family: str):
    """A tiny tower: width 32, one or two layers, 4×4 patches."""
    if family == "qwen2_vl":
        return tf.Qwen2VLVisionConfig(depth=1, embed_dim=32, hidden_size=48, num_heads=4, mlp_ratio=2,
                                      patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2)
    if family == "qwen2_5_vl":  # one windowed and one full-attention block; windows of 2×2 merged patches
        return tf.Qwen2_5_VLVisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=48,
                                         patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2,
                                         window_size=2 * MERGE * PATCH, fullatt_block_indexes=[1])
    if family == "siglip2":
        return tf.Siglip2VisionConfig(**_TOWER, num_patches=16, vision_use_head=False)
    if family == "pixtral":
        return tf.PixtralVisionConfig(**_TOWER, image_size=48, head_dim=8)
    raise KeyError(family)


def image_processor(family: str):
    """The family's (PIL) image processor, sized for tiny images: at most 12×12 patches."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if family in ("qwen2_vl", "qwen2_5_vl"):
            return tf.Qwen2VLImageProcessor(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2,
                                            size={"shortest_edge": 64 * 4, "longest_edge": 64 * 36})
        if family == "siglip2":
            return tf.Siglip2ImageProcessor(patch_size=PATCH, max_num_patches=64)
        if family == "pixtral":
            return tf.PixtralImageProcessor(patch_size=PATCH, size={"longest_edge": 48})
    raise KeyError(family)


def native(family: str):
    """transformers' own model for the family, and a function giving its image features (one tensor per image)."""
    torch.manual_seed(0)
    config = tower_config(family)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        text = dict(vocab_size=tiny.VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, bos_token_id=None,
                    eos_token_id=None)
        cls, config_cls = ((tf.Qwen2VLModel, tf.Qwen2VLConfig) if family == "qwen2_vl"
                           else (tf.Qwen2_5_VLModel, tf.Qwen2_5_VLConfig))
        model = cls(config_cls(vision_config=config.to_dict(), text_config=text)).eval()
        return model.visual, lambda out: list(model.get_image_features(out["pixel_values"],
                                                                         out["image_grid_thw"]).pooler_output)
    if family == "siglip2":
        model = tf.Siglip2VisionModel(config).eval()

        def features(out):
            hidden = model(**out).last_hidden_state
            return [h[m.bool()] for h, m in zip(hidden, out["pixel_attention_mask"])]

        return model, features
    model = tf.PixtralVisionModel(config).eval()
    counts = lambda out: (out["image_sizes"] // PATCH).prod(-1).tolist()  # noqa: E731
    return model, lambda out: list(model(**out).last_hidden_state[0].split(counts(out)))


def copy_of(module: torch.nn.Module) -> torch.nn.Module:
    """The same weights in a tower built anew from its config."""
    copy = type(module)(module.config).eval()
    copy.load_state_dict(module.state_dict())
    return copy


def images(sizes, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


SIZES = [(20, 30), (50, 17), (8, 8)]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    tower, features = native(request.param)
    processor = image_processor(request.param)
    encoder = ModalEncoderModule(copy_of(tower), projector=torch.nn.Identity())  # the tower's features as they are
    return request.param, features, processor, encoder


def test_features_equal_transformers_own(family):
    name, features, processor, encoder = family
    out = dict(processor(images=images(SIZES), return_tensors="pt"))
    with torch.no_grad():
        expected = features(out)
        got = encoder(**out)
    assert len({e.shape[0] for e in expected}) == len(SIZES)  # three images, three feature counts
    torch.testing.assert_close(got, torch.cat(expected), atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def counting(family):
    """The family's MultimodalProcessor, counting features from the tower's config."""
    _, _, processor, encoder = family
    mllm = MultimodalModel({"vision": encoder}, tiny.llm("llama"))
    return MultimodalProcessor({"vision": processor}, tiny.tokenizer(), model=mllm)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.tuples(st.integers(4, 70), st.integers(4, 70)), min_size=1, max_size=3),
       seed=st.integers(0, 2**16))
def test_processor_counts_equal_the_features_produced(family, counting, sizes, seed):
    _, features, _, encoder = family
    out, counts = counting.process_modality("vision", {"images": images(sizes, seed)})
    with torch.no_grad():
        per_image = [f.shape[0] for f in features(out)]
        produced = encoder(**out).shape[0]
    assert counts == per_image and sum(counts) == produced


# ----------------------------------------------------------------------------------------------- training
PROMPT_TOKEN = "<image>"


def sample(n_images: int, seed: int) -> dict:
    sizes = [(12 + 9 * ((seed + i) % 5), 40 - 7 * ((seed + 2 * i) % 4)) for i in range(n_images)]
    prompt = " ".join([PROMPT_TOKEN] * n_images + ["which digit ?"])
    return {"prompt": prompt, "answer": "seven two" if seed % 2 else "three", "images": images(sizes, seed)}


SAMPLES = [sample(1, 0), sample(0, 1), sample(2, 2), sample(1, 3)]  # images of different sizes, one text-only


@pytest.fixture(scope="module")
def trainable(family):
    name, _, processor, encoder = family
    torch.manual_seed(0)
    mllm = MultimodalModel({"vision": ModalEncoderModule(copy_of(encoder.module))}, tiny.llm("llama")).train()
    proc = MultimodalProcessor({"vision": processor}, tiny.tokenizer(), model=mllm,
                               predefined_tokens={"vision": PROMPT_TOKEN})
    return mllm, MultimodalCollator(proc)


def alone_losses(mllm, collate, samples=SAMPLES) -> torch.Tensor:
    return torch.stack([mllm(**collate([s])).loss for s in samples])


def batch_losses(mllm, batch, sample_of_token, n=len(SAMPLES)) -> torch.Tensor:
    out = mllm(**batch)
    targets = next_token_targets(batch["labels"], out.logits_positions)
    owners = next_token_targets(sample_of_token, out.logits_positions).clamp(min=0)
    return per_sample_loss(out.logits, targets, owners, n)


def packed_or_padded(batch, packed: bool, n: int):
    """``batch`` packed into fewer rows (or kept padded), and the sample of each token (-1 at padding)."""
    if packed:
        batch, sample_of_token = pack_batch(batch, capacity=int(batch["attention_mask"].sum(1).max()) * 2)
        assert batch["input_ids"].shape[0] < n
        return batch, sample_of_token
    rows = torch.arange(n)[:, None].expand_as(batch["input_ids"])
    return batch, rows.masked_fill(batch["attention_mask"] == 0, -1)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_mixed_sizes_train_like_each_sample_alone(trainable, packed):
    mllm, collate = trainable
    batch, sample_of_token = packed_or_padded(collate(SAMPLES), packed, len(SAMPLES))
    got = batch_losses(mllm, batch, sample_of_token)
    with torch.no_grad():
        expected = alone_losses(mllm, collate)
    torch.testing.assert_close(got.detach(), expected, atol=1e-5, rtol=0)
    got.mean().backward()  # a train step reaches the tower
    grads = [p.grad for p in mllm.vision_encoder.module.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    mllm.zero_grad()


def assert_encoded_ahead_pads_into_the_same_batch(collate, samples) -> dict:
    """Each of ``samples`` encoded on its own into Arrow, then padded, gives ``collate(samples)`` exactly (returned)."""
    encoded = encode_split(Dataset.from_list(samples), collate, "train")
    whole = collate(samples)
    padded = EncodedCollate(collate)(EncodedDataset(encoded).__getitems__(list(range(len(samples)))))
    assert whole.keys() == padded.keys()
    for key in whole:
        torch.testing.assert_close(padded[key], whole[key], atol=0, rtol=0)
    return whole


def test_samples_encoded_ahead_pad_into_the_same_batch(trainable, family):
    whole = assert_encoded_ahead_pads_into_the_same_batch(trainable[1], SAMPLES)
    direct = family[2](images=[image for s in SAMPLES for image in s["images"]], return_tensors="pt")
    for key, value in direct.items():  # the batch holds what the processor gives for all its images at once
        torch.testing.assert_close(whole[key], value, atol=0, rtol=0)


def test_save_and_reload_keep_callbacks_and_counts(trainable, tmp_path):
    mllm, collate = trainable
    mllm.save_pretrained(tmp_path / "model")
    collate.processor.save_pretrained(tmp_path / "processor")
    again = MultimodalModel.from_pretrained(tmp_path / "model").train()
    processor = MultimodalProcessor.from_pretrained(tmp_path / "processor")
    batch = MultimodalCollator(processor)(SAMPLES)
    torch.testing.assert_close(batch["input_ids"], collate(SAMPLES)["input_ids"], atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).loss, mllm(**batch).loss, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("size", [(3, 700), (700, 2)], ids=["flat", "thin"])
def test_an_image_too_elongated_for_the_patches_names_its_sample(trainable, family, size):
    if family[0] == "siglip2":
        pytest.skip("SigLIP2 NaFlex fits any image into its patch budget (a 1-patch-high grid at worst)")
    _, collate = trainable
    bad = {**sample(1, 5), "images": images([size])}
    with pytest.raises(SampleError, match=rf"Sample 2, field 'images': .*{size[1]}×{size[0]} pixels"):
        collate([SAMPLES[0], SAMPLES[1], bad])


def test_a_rank_without_images_runs_the_tower_on_a_placeholder(trainable):
    mllm, collate = trainable
    batch = collate([SAMPLES[1]])  # text only
    assert "image_grid_thw" not in batch and "pixel_values" not in batch
    loss, expected = tiny.placeholder_loss(mllm, batch)
    torch.testing.assert_close(loss, expected, atol=0, rtol=0)
    grads = [p.grad for p in mllm.vision_encoder.parameters() if p.requires_grad]
    assert all(g is not None and not g.any() for g in grads)  # in the graph, with zero gradients
    mllm.zero_grad()


def test_lengths_measured_without_encoding_are_exact(trainable):
    _, collate = trainable
    dataset = Dataset.from_list(SAMPLES)  # images stored as Arrow Image features, measured undecoded
    expected = [len(ids) for ids in collate.encode(SAMPLES)["input_ids"]]
    assert len(set(expected)) > 2 and sample_lengths(dataset, collate) == expected


@pytest.mark.parametrize("preprocess", [True, False], ids=["encoded", "raw"])
def test_data_module_packs_mixed_sizes_into_rows_the_model_takes(trainable, preprocess):
    mllm, collate = trainable
    lengths = [len(ids) for ids in collate.encode(SAMPLES)["input_ids"]]
    data = MultimodalDataModule(train=Dataset.from_list(SAMPLES * 2), processor=collate.processor, batch_size=1,
                                max_length=max(lengths) + 8, pack=True, preprocess=preprocess)
    data.setup()
    tokens, rows = 0, 0
    with torch.no_grad():
        for batch in data.train_dataloader():  # every row's placeholders match its images' features
            assert torch.isfinite(mllm(**batch).loss)
            tokens += int((batch["input_ids"] != collate.pad_token_id).sum())  # real tokens
            rows += batch["input_ids"].shape[0]
    assert data.lengths["train"] == lengths * 2 and tokens == sum(lengths) * 2 and rows < 2 * len(SAMPLES)
