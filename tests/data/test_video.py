"""Video items: decoded from real files with PyAV, sampled as transformers samples frames, and refused with the
sample and field named when they cannot be read, keep no frame, or the sampling setting is invalid."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import transformers as tf

from cornstarch.data.collator import MultimodalCollator
from cornstarch.data.media import SampleError
from cornstarch.data.video import frame_indices, load_video
from cornstarch.demo.clips import write_video
from cornstarch.models.multimodal_language_model import ModalEncoderModule, MultimodalModel, MultimodalProcessor
from cornstarch.models.video import VideoFramesProcessor, check_sampling, video_callbacks
from tests import tiny


def clip(frames: int = 6, height: int = 16, width: int = 24, seed: int = 0) -> np.ndarray:
    """Smooth frames (H.264 keeps them within a few levels), each brighter than the one before."""
    rng = np.random.default_rng(seed)
    base = np.kron(rng.integers(0, 200, (height // 8, width // 8, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    return np.stack([base + 5 * t for t in range(frames)]).astype(np.uint8)


@pytest.mark.parametrize("suffix,codec", [(".mp4", "libx264"), (".mkv", "ffv1"), (".webm", "libvpx-vp9")])
def test_files_decode_to_the_frames_written(tmp_path, suffix, codec):
    frames = clip()
    path = tmp_path / f"clip{suffix}"
    write_video(path, frames, fps=8, codec=codec, options={"crf": "0"} if codec == "libx264" else
                {"lossless": "1"} if codec == "libvpx-vp9" else {})
    got = load_video(str(path), index=0)
    assert got.shape == frames.shape and got.dtype == np.uint8
    assert np.abs(got.astype(int) - frames).max() <= 3  # colour conversion rounding only
    assert load_video({"bytes": path.read_bytes()}, index=0).shape == frames.shape  # in-memory bytes too


@pytest.mark.parametrize("total,video_fps,fps,max_frames", [
    (10, 5.0, 2.0, None), (30, 30.0, 4.0, None), (17, 25.0, None, 5), (120, 24.0, 2.0, 3), (7, 3.0, 3.0, None),
    (9, None, None, 9), (9, None, None, 20), (100, 29.97, 1.0, None)])
def test_sampling_keeps_the_frames_transformers_keeps(total, video_fps, fps, max_frames):
    """transformers' ``BaseVideoProcessor.sample_frames``: ``int(total / video_fps * fps)`` frames (at most
    ``max_frames``) at ``arange(0, total, total / n)``."""
    n = total if fps is None else int(total / video_fps * fps)
    n = min(n, total) if max_frames is None else min(n, max_frames, total)
    expected = torch.arange(0, total, total / n).int().tolist()
    assert frame_indices(total, video_fps, fps, max_frames).tolist() == expected


def test_sampling_a_file_by_fps_and_max_frames(tmp_path):
    frames = clip(frames=12)
    write_video(tmp_path / "a.mp4", frames, fps=6)  # 2 s
    by_fps = load_video(str(tmp_path / "a.mp4"), index=0, fps=2)  # 4 frames: 0, 3, 6, 9
    assert np.abs(by_fps.astype(int) - frames[[0, 3, 6, 9]]).max() <= 3
    assert load_video(str(tmp_path / "a.mp4"), index=0, fps=2, max_frames=3).shape[0] == 3


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("fps,max_frames,match", [
    (0, None, "fps must be a finite number > 0"), (-1.5, None, "fps must be"), (float("nan"), None, "fps must"),
    ("2", None, "fps must"), (None, 0, "max_frames must be an integer >= 1"), (None, 2.5, "max_frames must"),
    (None, True, "max_frames must")])
def test_invalid_sampling_settings_are_refused(fps, max_frames, match):
    with pytest.raises(ValueError, match=match):
        check_sampling(fps, max_frames)
    with pytest.raises(ValueError, match=match):
        VideoFramesProcessor(None, fps=fps, max_frames=max_frames)


@pytest.fixture(scope="module")
def collate():
    """A collator whose video modality samples 2 frames per second."""
    torch.manual_seed(0)
    tower = tiny.vision_model("clip")
    mllm = MultimodalModel({"video": ModalEncoderModule(tower, **video_callbacks(tower, pool=2))}, tiny.llm("llama"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images = tf.CLIPImageProcessor(size={"shortest_edge": tiny.IMAGE_SIZE},
                                       crop_size={"height": tiny.IMAGE_SIZE, "width": tiny.IMAGE_SIZE})
    processor = MultimodalProcessor({"video": VideoFramesProcessor(images, pool=2, fps=2)}, tiny.tokenizer(),
                                    model=mllm, predefined_tokens={"video": "<video>"})
    return MultimodalCollator(processor)


def bad_sample(video) -> dict:
    return {"prompt": "<video> which digit ?", "answer": "three", "videos": [video]}


@pytest.mark.parametrize("kind,match", [
    ("garbage", r"corrupt or undecodable video"),
    ("missing", r"video file not found"),
    ("text file", r"unsupported video file type '\.txt'"),
    ("no frames", r"the video has no frames \(an empty clip\)"),
    ("too short for fps", r"sampling keeps no frame of this 2-frame clip \(0\.2 s at 10 fps\)"),
    ("no rate", r"frames given decoded carry no frame rate, so they cannot be sampled at fps=2"),
    ("ragged frames", r"the frames have different sizes"),
])
def test_a_video_that_yields_no_frames_names_its_sample(collate, tmp_path, kind, match):
    good = bad_sample(clip(frames=4))
    good["videos"] = [{"frames": clip(frames=4), "fps": 4}]
    if kind == "garbage":
        (tmp_path / "bad.mp4").write_bytes(b"\x00not a video" * 64)
        video = str(tmp_path / "bad.mp4")
    elif kind == "missing":
        video = str(tmp_path / "nowhere.mp4")
    elif kind == "text file":
        (tmp_path / "notes.txt").write_text("hello")
        video = str(tmp_path / "notes.txt")
    elif kind == "no frames":
        video = {"frames": np.zeros((0, 8, 8, 3), np.uint8), "fps": 4}
    elif kind == "too short for fps":
        write_video(tmp_path / "short.mp4", clip(frames=2), fps=10)
        video = str(tmp_path / "short.mp4")
    elif kind == "no rate":
        video = clip(frames=4)
    else:
        video = [np.zeros((8, 8, 3), np.uint8), np.zeros((16, 8, 3), np.uint8)]
    with pytest.raises(SampleError, match=rf"^Sample 2, field 'videos': {match}"):
        collate([good, {"prompt": "hello", "answer": "two"}, bad_sample(video)])


def test_a_good_mixed_batch_reads_every_video(collate, tmp_path):
    write_video(tmp_path / "a.mp4", clip(frames=8), fps=4)  # 2 s at 2 fps: 4 frames
    batch = collate([bad_sample(str(tmp_path / "a.mp4")), {"prompt": "hello", "answer": "two"},
                     bad_sample({"frames": clip(frames=3), "fps": 2})])  # 3 frames, padded to 4
    assert batch["video_frames"].tolist() == [4, 4] and batch["pixel_values_videos"].shape[0] == 8
    tokens = (batch["input_ids"] == collate.processor.token_ids["video"]).sum(1).tolist()
    assert tokens == [2 * tiny.VISION_TOKENS["clip"], 0, 2 * tiny.VISION_TOKENS["clip"]]
