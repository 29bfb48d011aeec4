"""Video as a modality: Qwen2-VL's video inputs laid out as transformers' video processor lays them out, features equal
to ``get_video_features`` of transformers' own models, image towers per frame with temporal pooling, counts equal to
the features for random frame counts and sizes, and a mixed batch (images of several sizes, a video, text only) that
trains like each sample alone, packed and padded."""

from __future__ import annotations

import ast
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cornstarch.data.collator import MultimodalCollator
from cornstarch.models.multimodal_language_model import ModalEncoderModule, MultimodalModel, MultimodalProcessor
from cornstarch.models.video import (MergedStepPooling, Qwen2VLVideoFramesProcessor, TemporalPooling,
                                     VideoFramesProcessor, qwen2_vl_video_inputs, video_callbacks)
from tests import tiny
from tests.models.test_dynamic_resolution import (PATCH, alone_losses, assert_encoded_ahead_pads_into_the_same_batch,
                                                  batch_losses, copy_of, image_processor, images, native,
                                                  packed_or_padded)

SIZE = {"shortest_edge": 64, "longest_edge": 64 * 36}  # frames of 8×8 .. 48×48 pixels keep their size (factor 8)


def videos(specs, seed: int = 0) -> list[np.ndarray]:
    """Random RGB clips, one per ``(frames, height, width)``."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8) for t, h, w in specs]


def video_processor(**kwargs) -> Qwen2VLVideoFramesProcessor:
    return Qwen2VLVideoFramesProcessor(patch_size=PATCH, merge_size=2, temporal_patch_size=2, size=SIZE, **kwargs)


def transformers_patchify():
    """``Qwen2VLVideoProcessor.patchify``, transformers' own code, read from its source (the class itself needs
    torchvision to be imported; its ``patchify`` is plain torch)."""
    source = Path(importlib.util.find_spec("transformers.models.qwen2_vl.video_processing_qwen2_vl").origin)
    tree = ast.parse(source.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Qwen2VLVideoProcessor")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "patchify")
    fn.args.args[0].annotation = None
    namespace = {"torch": torch}
    exec(compile(ast.Module([fn], type_ignores=[]), "patchify", "exec"), namespace)  # noqa: S102
    return namespace["patchify"]


# ----------------------------------------------------------------------------------------------- layout
def test_video_layout_equals_transformers_video_processor():
    """Frames whose size needs no resizing: normalised by hand, patchified by transformers' own video code."""
    patchify = transformers_patchify()
    processor = video_processor()
    for t, h, w in [(4, 16, 24), (3, 24, 8), (1, 8, 8), (6, 40, 16)]:
        clip = videos([(t, h, w)], seed=t + h)[0]
        mean, std = (np.asarray(processor.image_mean)[:, None, None], np.asarray(processor.image_std)[:, None, None])
        frames = torch.from_numpy(((clip.transpose(0, 3, 1, 2) / 255.0 - mean) / std).astype(np.float32))
        expected, *grid = patchify(None, frames[None], patch_size=PATCH, merge_size=2, temporal_patch_size=2)
        out = processor(videos=[clip], return_tensors="pt")
        assert out["video_grid_thw"].tolist() == [grid]
        torch.testing.assert_close(out["pixel_values_videos"], expected[0], atol=1e-6, rtol=0)


def test_video_of_repeated_frames_equals_the_image_processor_on_each_frame():
    """Sizes that need resizing: a clip holding each image twice is those images' patches, time step by step."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = tf.Qwen2VLImageProcessor(patch_size=PATCH, merge_size=2, temporal_patch_size=2, size=SIZE)
    shots = images([(21, 37)] * 3, seed=1)
    clip = np.stack([np.asarray(s) for s in shots for _ in range(2)])  # a a b b c c
    out = video_processor()(videos=[clip], return_tensors="pt")
    each = image(images=shots, return_tensors="pt")
    torch.testing.assert_close(out["pixel_values_videos"], each["pixel_values"], atol=0, rtol=0)
    assert out["video_grid_thw"].tolist() == [[3, *each["image_grid_thw"][0, 1:].tolist()]]


# ----------------------------------------------------------------------------------------------- features
@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def qwen(request):
    """transformers' own model (for ``get_video_features``) and a video encoder on a copy of its tower."""
    tower, _ = native(request.param)  # seeded: the tower of transformers' own model
    config_cls, model_cls = ((tf.Qwen2VLConfig, tf.Qwen2VLModel) if request.param == "qwen2_vl"
                             else (tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLModel))
    text = dict(vocab_size=tiny.VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, bos_token_id=None, eos_token_id=None)
    full = model_cls(config_cls(vision_config=tower.config.to_dict(), text_config=text)).eval()
    full.visual.load_state_dict(tower.state_dict())
    copy = copy_of(tower)
    encoder = ModalEncoderModule(copy, projector=torch.nn.Identity(), **video_callbacks(copy))
    return full, encoder


def test_video_features_equal_transformers_get_video_features(qwen):
    full, encoder = qwen
    out = video_processor()(videos=videos([(4, 16, 24), (3, 8, 32), (2, 24, 24)]), return_tensors="pt")
    with torch.no_grad():
        expected = full.get_video_features(out["pixel_values_videos"], out["video_grid_thw"]).pooler_output
        got = encoder(**out)
    assert [e.shape[0] for e in expected] == [2 * 2 * 3, 2 * 1 * 4, 1 * 3 * 3]
    torch.testing.assert_close(got, torch.cat(expected), atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def counting(qwen):
    _, encoder = qwen
    mllm = MultimodalModel({"video": encoder}, tiny.llm("llama"))
    return MultimodalProcessor({"video": video_processor(max_frames=6)}, tiny.tokenizer(), model=mllm)


CLIPS = st.lists(st.tuples(st.integers(1, 9), st.integers(8, 44), st.integers(8, 44)), min_size=1, max_size=3)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=CLIPS, seed=st.integers(0, 2**16))
def test_processor_counts_equal_the_video_features_produced(qwen, counting, specs, seed):
    full, encoder = qwen
    out, counts = counting.process_modality("video", {"videos": videos(specs, seed)})
    with torch.no_grad():
        per_video = [f.shape[0] for f in
                     full.get_video_features(out["pixel_values_videos"], out["video_grid_thw"]).pooler_output]
        produced = encoder(**out).shape[0]
    assert counts == per_video and sum(counts) == produced


@pytest.mark.parametrize("pool", [True, False])
@pytest.mark.parametrize("time_encoding", [True, False])
def test_merged_step_pooling_counts_equal_the_features_produced(qwen, pool, time_encoding):
    full, _ = qwen
    callback = MergedStepPooling(time_encoding=time_encoding, normalize=True, pool=pool)
    encoder = ModalEncoderModule(copy_of(full.visual), projector=torch.nn.Identity(),
                                 preprocess_callback=qwen2_vl_video_inputs, postprocess_module_callback=callback)
    mllm = MultimodalModel({"video": encoder}, tiny.llm("llama"))
    processor = MultimodalProcessor({"video": video_processor(max_frames=6)}, tiny.tokenizer(), model=mllm)
    out, counts = processor.process_modality("video", {"videos": videos([(4, 16, 24), (3, 8, 32), (2, 24, 24)])})
    with torch.no_grad():
        merged = full.get_video_features(out["pixel_values_videos"], out["video_grid_thw"]).pooler_output
        got = encoder(**out)
    assert counts == ([2, 2, 1] if pool else [f.shape[0] for f in merged]) and got.shape[0] == sum(counts)
    if pool:  # each step: the mean of its merged features, normalised, plus its index's encoding
        first = torch.nn.functional.layer_norm(merged[0][:merged[0].shape[0] // 2].mean(0), (merged[0].shape[-1],))
        if time_encoding:
            first = first + torch.tensor([0.0, 1.0] * (first.shape[0] // 2))
        torch.testing.assert_close(got[0], first, atol=1e-5, rtol=0)
    assert torch.allclose(got.mean(-1), torch.zeros(1), atol=1e-5) or time_encoding  # unit-scale features


# ----------------------------------------------------------------------------------------------- image towers
def clip_tower() -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny.vision_model("clip")


def frames_processor(pool: int, **kwargs) -> VideoFramesProcessor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images_ = tf.CLIPImageProcessor(size={"shortest_edge": tiny.IMAGE_SIZE},
                                        crop_size={"height": tiny.IMAGE_SIZE, "width": tiny.IMAGE_SIZE})
    return VideoFramesProcessor(images_, pool=pool, **kwargs)


@pytest.mark.parametrize("pool", [1, 2, 3])
def test_temporal_pooling_averages_each_videos_frames(pool):
    tower = clip_tower()
    encoder = ModalEncoderModule(copy_of(tower), projector=torch.nn.Identity(), **video_callbacks(tower, pool=pool))
    clips = videos([(5, 20, 30), (2, 40, 32)], seed=pool)
    out = frames_processor(pool)(videos=clips, return_tensors="pt")
    with torch.no_grad():
        got = encoder(**out)
        expected = []
        for clip in clips:  # the oracle: the tower on each video's frames (last one repeated), means of groups
            frames = frames_processor(1)(videos=[np.concatenate([clip, clip[-1:].repeat(-len(clip) % pool, 0)])],
                                         return_tensors="pt")["pixel_values_videos"]
            hidden = tower(pixel_values=frames).last_hidden_state
            expected.append(hidden.reshape(-1, pool, *hidden.shape[1:]).mean(1).flatten(0, 1))
    torch.testing.assert_close(got, torch.cat(expected), atol=1e-6, rtol=0)


@settings(max_examples=20, deadline=None)
@given(specs=CLIPS, pool=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_frame_counts_equal_the_pooled_features_produced(specs, pool, seed):
    tower = clip_tower()
    mllm = MultimodalModel({"video": ModalEncoderModule(tower, **video_callbacks(tower, pool=pool))},
                           tiny.llm("llama"))
    processor = MultimodalProcessor({"video": frames_processor(pool)}, tiny.tokenizer(), model=mllm)
    clips = videos(specs, seed)
    out, counts = processor.process_modality("video", {"videos": clips})
    with torch.no_grad():
        alone = [mllm.video_encoder(**processor.process_modality("video", {"videos": [c]})[0]).shape[0] for c in clips]
    assert counts == alone == [-(-t // pool) * tiny.VISION_TOKENS["clip"] for t, _, _ in specs]


def test_time_encoding_marks_each_step_with_its_index_in_its_video():
    pool = TemporalPooling(2, time_encoding=True)
    features = torch.zeros(10, 3, 8)  # videos of 4 and 6 frames: 2 and 3 steps
    got = pool({"video_frames": torch.tensor([4, 6])}, (features,))[0]  # [5 steps, 3 tokens, 8]
    index = torch.tensor([0, 1, 0, 1, 2], dtype=torch.float32)
    rates = 10000.0 ** (-torch.arange(0, 8, 2) / 8)
    expected = torch.stack([torch.sin(index[:, None] * rates), torch.cos(index[:, None] * rates)], -1).flatten(1)
    torch.testing.assert_close(got, expected[:, None, :].expand(5, 3, 8), atol=1e-6, rtol=0)
    assert TemporalPooling(**pool.get_config()).time_encoding


def test_pooling_refuses_frames_the_processor_did_not_pad():
    with pytest.raises(ValueError, match="3 frames cannot be pooled 2 at a time: give the video processor pool=2"):
        TemporalPooling(2)({}, (torch.zeros(3, 4, 8),))
    with pytest.raises(ValueError, match="pool must be an integer >= 1"):
        frames_processor(0)


# ----------------------------------------------------------------------------------------------- training
SAMPLES = [
    {"prompt": "<image> <video> which digit ?", "answer": "seven two", "images": images([(20, 30)], 0),
     "videos": videos([(5, 16, 24)], 0)},
    {"prompt": "which digit ?", "answer": "three"},
    {"prompt": "<image> <image> which digit ?", "answer": "three", "images": images([(50, 17), (8, 8)], 2)},
    {"prompt": "<video> which digit ?", "answer": "seven two", "videos": videos([(3, 32, 8)], 3)},
]


def mixed(path: str):
    """A Qwen2-VL image tower and a video tower (its own path, or CLIP frames pooled 2 at a time) on a tiny Llama."""
    torch.manual_seed(0)
    images_tower, _ = native("qwen2_vl")
    video_tower = copy_of(images_tower) if path == "qwen2_vl" else clip_tower()
    encoders = {"vision": ModalEncoderModule(copy_of(images_tower)),
                "video": ModalEncoderModule(video_tower, **video_callbacks(video_tower, pool=2))}
    mllm = MultimodalModel(encoders, tiny.llm("llama")).train()
    videos_ = video_processor(max_frames=4) if path == "qwen2_vl" else frames_processor(2, max_frames=4)
    processor = MultimodalProcessor({"vision": image_processor("qwen2_vl"), "video": videos_}, tiny.tokenizer(),
                                    model=mllm, predefined_tokens={"vision": "<image>", "video": "<video>"})
    return mllm, MultimodalCollator(processor)


@pytest.fixture(scope="module", params=["qwen2_vl", "clip_frames"])
def trainable(request):
    return mixed(request.param)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_images_video_and_text_train_like_each_sample_alone(trainable, packed):
    mllm, collate = trainable
    batch = collate(SAMPLES)
    assert batch["video_grid_thw" if "video_grid_thw" in batch else "video_frames"].shape[0] == 2
    batch, sample_of_token = packed_or_padded(batch, packed, len(SAMPLES))
    got = batch_losses(mllm, batch, sample_of_token, len(SAMPLES))
    with torch.no_grad():
        expected = alone_losses(mllm, collate, SAMPLES)
    torch.testing.assert_close(got.detach(), expected, atol=1e-5, rtol=0)
    got.mean().backward()  # a train step reaches both towers
    for key in ("vision", "video"):  # (CLIP's post_layernorm, behind its pooled output, stays unused)
        grads = [p.grad for p in mllm.encoders[key].module.parameters() if p.grad is not None]
        assert len(grads) > 4 and all(torch.isfinite(g).all() and g.any() for g in grads), key
    mllm.zero_grad()


def test_videos_encoded_ahead_pad_into_the_same_batch(trainable):
    assert_encoded_ahead_pads_into_the_same_batch(trainable[1], SAMPLES)


def test_video_model_and_processor_save_and_load(trainable, tmp_path):
    mllm, collate = trainable
    collate.processor.save_pretrained(tmp_path / "processor")
    mllm.save_pretrained(tmp_path / "model")
    again = MultimodalProcessor.from_pretrained(tmp_path / "processor")
    assert again.encoder_processors["video"].max_frames == 4
    batch = MultimodalCollator(again)(SAMPLES)
    torch.testing.assert_close(batch["input_ids"], collate(SAMPLES)["input_ids"], atol=0, rtol=0)
    model = MultimodalModel.from_pretrained(tmp_path / "model").train()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).loss, mllm(**batch).loss, atol=0, rtol=0)


def test_a_rank_without_videos_runs_the_video_tower_on_a_placeholder(trainable):
    mllm, collate = trainable
    batch = collate([SAMPLES[1]])  # text only
    loss, expected = tiny.placeholder_loss(mllm, batch)
    torch.testing.assert_close(loss, expected, atol=0, rtol=0)
    grads = [p.grad for p in mllm.video_encoder.parameters() if p.grad is not None]
    assert grads and all(not g.any() for g in grads)  # in the graph, with zero gradients
    mllm.zero_grad()
