"""Video as a modality: processors that turn sampled frames into model inputs, and the encoder callbacks.

A video item is an ``[frames, height, width, 3]`` array (the data layer decodes and samples files:
:func:`cornstarch.data.video.load_video`, with the processor's ``fps`` and ``max_frames``). Two ways to encode it:

- **An image tower per frame** (CLIP, SigLIP, ViT…): :class:`VideoFramesProcessor` runs the tower's image
  processor on every frame and returns ``pixel_values_videos`` ``[all frames, C, H, W]`` and ``video_frames``
  ``[videos]``; the encoder takes them through :func:`frames_as_images` and averages each ``frames`` consecutive
  frames' features with :class:`TemporalPooling`. A video yields ``frames / pool × tokens per frame`` features
  (each video's frames are padded to a multiple of ``pool`` by repeating its last frame).
- **Qwen2-VL's own video path** (also Qwen2.5-VL's tower): :class:`Qwen2VLVideoFramesProcessor` returns
  ``pixel_values_videos`` ``[patches, C·t·p²]`` and ``video_grid_thw`` ``[videos, 3]`` laid out as transformers'
  ``Qwen2VLVideoProcessor`` does (frames resized as ``Qwen2VLImageProcessor`` resizes images, ``temporal_patch_size``
  frames per patch, the last frame repeated to fill the last one); the tower runs with :func:`qwen2_vl_video_inputs`
  and :func:`~cornstarch.models.dynamic_resolution.merged_patches` (:func:`video_callbacks`). A video yields
  ``t·h·w / merge²`` features.

Counts come from the same place as images' (:mod:`cornstarch.models.feature_counts`): frames count as images, and
:class:`TemporalPooling` folds each video's frames into its count.

>>> import numpy as np
>>> from transformers import Qwen2VLVisionConfig
>>> from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
>>> from cornstarch.models.multimodal_language_model import ModalEncoderModule
>>> tower = Qwen2VisionTransformerPretrainedModel(Qwen2VLVisionConfig(
...     depth=1, embed_dim=16, hidden_size=24, num_heads=2, mlp_ratio=1, patch_size=4))
>>> encoder = ModalEncoderModule(tower, projector=torch.nn.Linear(24, 8), **video_callbacks(tower))
>>> processor = Qwen2VLVideoFramesProcessor(patch_size=4, size={"shortest_edge": 64, "longest_edge": 4096})
>>> out = processor(videos=[np.zeros((3, 16, 24, 3), dtype=np.uint8)], return_tensors="pt")  # 3 frames, 16×24
>>> out["pixel_values_videos"].shape, out["video_grid_thw"].tolist()  # 2 time steps (last frame repeated)
(torch.Size([48, 96]), [[2, 4, 6]])
>>> encoder(**out).shape  # 2 · 4 · 6 / 2²
torch.Size([12, 8])
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable

import numpy as np
import torch
from transformers import BatchFeature, Qwen2VLImageProcessorPil

from .builder import ProcessorSpec
from .callbacks import ConfiguredCallback
from .dynamic_resolution import merged_patches
from .multimodal_language_model.import_paths import import_path, resolve

__all__ = ["FRAMES", "MergedStepPooling", "check_sampling", "frame_placeholder", "Qwen2VLVideoFramesProcessor", "TemporalPooling", "VideoFramesProcessor", "frames_as_images",
           "mean_of_frame_pairs", "qwen2_vl_video_inputs", "repeat_last_frame", "step_encoding", "timed_frame_pairs",
           "video_callbacks", "merged_steps", "timed_merged_steps", "normed_timed_steps", "normed_timed_patches",
           "normed_patches"]

FRAMES = "video_frames"  # frames per video, beside per-frame outputs laid end to end


def check_sampling(fps: float | None = None, max_frames: int | None = None) -> None:
    """Refuse a frame sampling setting that can select nothing or is not a number.

    Args:
        fps: frames kept per second of video, > 0; ``None`` keeps every frame's rate.
        max_frames: most frames kept per video, an integer ≥ 1; ``None`` for no limit.

    Raises:
        ValueError: naming the setting and its value.

    >>> check_sampling(fps=2, max_frames=8)
    >>> check_sampling(max_frames=0)
    Traceback (most recent call last):
        ...
    ValueError: max_frames must be an integer >= 1 (or None for no limit), got 0.
    """
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps)
                            or fps <= 0):
        raise ValueError(f"fps must be a finite number > 0 (or None to keep the video's own rate), got {fps!r}.")
    if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, (int, np.integer))
                                   or max_frames < 1):
        raise ValueError(f"max_frames must be an integer >= 1 (or None for no limit), got {max_frames!r}.")


def repeat_last_frame(frames: np.ndarray, multiple: int) -> np.ndarray:
    """``frames`` ``[frames, ...]`` with its last frame repeated until their number is a multiple of ``multiple``.

    >>> repeat_last_frame(np.arange(3), 2).tolist()
    [0, 1, 2, 2]
    """
    pad = -len(frames) % multiple
    return np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)]) if pad else frames


# ----------------------------------------------------------------------------------------------- Qwen2-VL
class Qwen2VLVideoFramesProcessor(Qwen2VLImageProcessorPil):
    """Qwen2-VL's video inputs from decoded frames, without torchvision: ``pixel_values_videos`` and
    ``video_grid_thw``, equal to what transformers' ``Qwen2VLVideoProcessor`` lays out.

    Each video's frames are resized, rescaled and normalised by ``Qwen2VLImageProcessor`` (all frames of a video
    share its size, hence one ``smart_resize``), then grouped ``temporal_patch_size`` at a time (the last frame
    repeated to fill the last group) into patches ``[C, t, p, p]``, ordered by time, then merge block, as the video
    processor orders them.

    Args:
        fps: frames per second the data layer keeps when it decodes a video (``None``: all).
        max_frames: most frames the data layer keeps per video (uniformly spread; ``None``: no limit).
        **kwargs: ``Qwen2VLImageProcessor`` settings (``patch_size``, ``merge_size``, ``temporal_patch_size``,
            ``size``, ``min_pixels``/``max_pixels``, normalisation).

    Raises:
        ValueError: for invalid ``fps`` / ``max_frames``.
    """

    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __init__(self, fps: float | None = None, max_frames: int | None = None, **kwargs: Any):
        check_sampling(fps, max_frames)
        super().__init__(**kwargs)
        self.fps, self.max_frames = fps, max_frames

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "fps": self.fps, "max_frames": self.max_frames}

    def __call__(self, videos: list[Any], return_tensors: str | None = None, **kwargs: Any) -> BatchFeature:
        """Process a batch of videos.

        Args:
            videos: each ``[frames, height, width, 3]`` (an array, or a list of frames).
            return_tensors: ``"pt"``, ``"np"`` or ``None``.
            **kwargs: ``Qwen2VLImageProcessor`` call arguments.

        Returns:
            ``pixel_values_videos`` ``[Σ t·h·w, C·temporal_patch_size·p²]`` and ``video_grid_thw`` ``[videos, 3]``.

        Raises:
            ValueError: for a video without frames, or what the image processor refuses (a frame too small or too
                elongated).
        """
        temporal = kwargs.get("temporal_patch_size") or self.temporal_patch_size
        patch = kwargs.get("patch_size") or self.patch_size
        patches, grids = [], []
        for i, video in enumerate(videos):  # processor side, on the CPU
            frames = list(video)
            if not frames:
                raise ValueError(f"video {i} has no frames.")
            out = super().__call__(images=frames, return_tensors="np", **kwargs)
            grid = np.asarray(out["image_grid_thw"])[0]  # [1, h, w]; every frame the same
            per_frame = np.asarray(out["pixel_values"]).reshape(len(frames), int(grid[1] * grid[2]), -1, temporal,
                                                                 patch * patch)
            first = per_frame[:, :, :, 0]  # [frames, h·w, C, p²]: the image processor repeats each frame in time
            first = repeat_last_frame(first, temporal)
            t = len(first) // temporal
            grouped = first.reshape(t, temporal, *first.shape[1:]).transpose(0, 2, 3, 1, 4)  # [t, h·w, C, tp, p²]
            patches.append(grouped.reshape(t * first.shape[1], -1))
            grids.append([t, int(grid[1]), int(grid[2])])
        return BatchFeature({"pixel_values_videos": np.concatenate(patches).astype(np.float32),
                             "video_grid_thw": np.asarray(grids, dtype=np.int64)}, tensor_type=return_tensors)


def qwen2_vl_video_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """Preprocess callback of a Qwen2-VL / Qwen2.5-VL tower fed videos: the video processor's names → the tower's.

    ``pixel_values_videos`` becomes ``hidden_states`` and ``video_grid_thw`` becomes ``grid_thw``.

    Args:
        inputs: the encoder's batch entries, with ``pixel_values_videos`` and ``video_grid_thw``.

    Returns:
        The tower's keyword arguments.

    Raises:
        ValueError: if ``video_grid_thw`` is missing.

    >>> out = qwen2_vl_video_inputs({"pixel_values_videos": torch.zeros(8, 96), "video_grid_thw": torch.tensor([[2, 2, 2]])})
    >>> sorted(out)
    ['grid_thw', 'hidden_states']
    """
    if inputs.get("video_grid_thw") is None:
        raise ValueError("A Qwen2-VL vision tower fed videos needs video_grid_thw beside pixel_values_videos (the "
                         "video processor returns both).")
    return {"hidden_states": inputs["pixel_values_videos"], "grid_thw": inputs["video_grid_thw"]}


qwen2_vl_video_inputs.input_names = ("pixel_values_videos", "video_grid_thw")

_VIDEO_CALLBACKS: dict[str, dict[str, Callable]] = {
    family: {"preprocess_callback": qwen2_vl_video_inputs, "postprocess_module_callback": merged_patches}
    for family in ("qwen2_vl_vision", "qwen2_5_vl_vision")
}


def video_callbacks(model: Any, pool: int = 1, time_encoding: bool = False) -> dict[str, Any]:
    """The ``ModalEncoderModule`` callbacks that feed a tower videos: its own video path where it has one
    (Qwen2-VL, Qwen2.5-VL), else frames as images averaged ``pool`` at a time.

    Args:
        model: the tower, or its config.
        pool: frames averaged into one step, for towers without a video path (:class:`TemporalPooling`).
        time_encoding: for those towers, also mark each step with its index in the video.

    Returns:
        Keyword arguments of ``ModalEncoderModule``.

    >>> from transformers import CLIPVisionConfig
    >>> video_callbacks(CLIPVisionConfig(), pool=2)["postprocess_module_callback"]
    TemporalPooling(frames=2, time_encoding=False)
    """
    config = getattr(model, "config", model)
    own = _VIDEO_CALLBACKS.get(getattr(config, "model_type", None))
    if own is not None:
        return dict(own)
    return {"preprocess_callback": frames_as_images,
            "postprocess_module_callback": TemporalPooling(pool, time_encoding=time_encoding)}


# ----------------------------------------------------------------------------------------------- image towers
class VideoFramesProcessor:
    """A video processor for an image tower: its image processor on every frame of every video.

    Each video's frames (after the data layer's sampling) are padded to a multiple of ``pool`` by repeating its
    last frame, so :class:`TemporalPooling` averages whole groups.

    Args:
        image_processor: the tower's image processor (any transformers image processor), or
            ``{"class_path": ..., "kwargs": {...}}`` to build one (as a YAML config gives it).
        pool: frames averaged into one step by the encoder's :class:`TemporalPooling` (1: every frame kept).
        fps, max_frames: frame sampling the data layer applies when decoding
            (:func:`cornstarch.data.video.frame_indices`).

    Raises:
        ValueError: for ``pool`` < 1 or invalid ``fps`` / ``max_frames``.

    >>> from transformers import CLIPImageProcessor
    >>> images = CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    >>> out = VideoFramesProcessor(images, pool=2)(videos=[np.zeros((3, 8, 8, 3), np.uint8)], return_tensors="pt")
    >>> out["pixel_values_videos"].shape, out["video_frames"].tolist()  # 3 frames padded to 4
    (torch.Size([4, 3, 8, 8]), [4])
    """

    CONFIG = "video_frames_processor.json"
    model_input_names = ["pixel_values_videos", FRAMES]

    def __init__(self, image_processor: Any, pool: int = 1, fps: float | None = None, max_frames: int | None = None):
        if isinstance(image_processor, dict):  # {"class_path": ..., "kwargs": {...}}, as a YAML config gives it
            image_processor = ProcessorSpec(**image_processor).build()
        if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
            raise ValueError(f"pool must be an integer >= 1 (frames averaged into one step), got {pool!r}.")
        check_sampling(fps, max_frames)
        self.image_processor, self.pool, self.fps, self.max_frames = image_processor, pool, fps, max_frames

    @property
    def valid_kwargs(self) -> Any:
        """The image processor's call arguments (passed on)."""
        return getattr(self.image_processor, "valid_kwargs", None)

    def __call__(self, videos: list[Any], return_tensors: str | None = None, **kwargs: Any) -> BatchFeature:
        """Process a batch of videos: all frames in one image-processor call.

        Args:
            videos: each ``[frames, height, width, 3]``.
            return_tensors: ``"pt"``, ``"np"`` or ``None``.
            **kwargs: the image processor's call arguments.

        Returns:
            ``pixel_values_videos`` ``[all frames, ...]`` (the image processor's ``pixel_values`` of the frames,
            video after video) and ``video_frames`` ``[videos]`` (frames per video, padded).

        Raises:
            ValueError: for a video without frames.
        """
        padded = []
        for i, video in enumerate(videos):  # processor side, on the CPU
            frames = np.asarray(video)
            if len(frames) == 0:
                raise ValueError(f"video {i} has no frames.")
            padded.append(repeat_last_frame(frames, self.pool))
        flat = [frame for frames in padded for frame in frames]
        out = self.image_processor(images=flat, return_tensors="np", **kwargs)
        return BatchFeature({"pixel_values_videos": np.asarray(out["pixel_values"]),
                             FRAMES: np.asarray([len(f) for f in padded], dtype=np.int64)}, tensor_type=return_tensors)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write the image processor and ``video_frames_processor.json`` (its class, ``pool``, ``fps``, ``max_frames``)."""
        os.makedirs(save_directory, exist_ok=True)
        self.image_processor.save_pretrained(save_directory)
        with open(os.path.join(save_directory, self.CONFIG), "w") as f:
            json.dump({"image_processor_class": import_path(type(self.image_processor)), "pool": self.pool,
                       "fps": self.fps, "max_frames": self.max_frames}, f, indent=2)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> "VideoFramesProcessor":
        """Load what :meth:`save_pretrained` wrote (offline)."""
        with open(os.path.join(path, cls.CONFIG)) as f:
            spec = json.load(f)
        image_processor = resolve(spec.pop("image_processor_class")).from_pretrained(path, **kwargs)
        return cls(image_processor, **spec)

    def __repr__(self) -> str:
        return (f"VideoFramesProcessor({type(self.image_processor).__name__}, pool={self.pool}, fps={self.fps}, "
                f"max_frames={self.max_frames})")


def frame_placeholder(encoder: Any, config: Any, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One video of zero frames, one pooling step long, for an image tower fed frames (a distributed rank whose
    batch has no video; see :func:`cornstarch.models.dummy_inputs.dummy_inputs`).

    >>> from transformers import CLIPVisionConfig
    >>> from types import SimpleNamespace
    >>> item = frame_placeholder(SimpleNamespace(postprocess_module_callback=TemporalPooling(2)),
    ...                          CLIPVisionConfig(image_size=8), torch.device("cpu"), torch.float32)
    >>> item["pixel_values_videos"].shape, item["video_frames"].tolist()
    (torch.Size([2, 3, 8, 8]), [2])
    """
    frames = getattr(encoder.postprocess_module_callback, "frames", 1)
    size = config.image_size
    h, w = size if isinstance(size, (tuple, list)) else (size, size)
    return {"pixel_values_videos": torch.zeros(frames, getattr(config, "num_channels", 3), h, w, device=device,
                                               dtype=dtype),
            FRAMES: torch.tensor([frames], device=device)}


def frames_as_images(inputs: dict[str, Any]) -> dict[str, Any]:
    """Preprocess callback of an image tower fed videos: ``pixel_values_videos`` (frames) become ``pixel_values``
    (``video_frames`` stays, for :class:`TemporalPooling`).

    >>> frames_as_images({"pixel_values_videos": torch.zeros(4, 3, 8, 8), "video_frames": torch.tensor([4])})["pixel_values"].shape
    torch.Size([4, 3, 8, 8])
    """
    return {**inputs, "pixel_values": inputs["pixel_values_videos"]}


frames_as_images.input_names = ("pixel_values_videos", FRAMES)
frames_as_images.replaces_inputs = True  # an image encoder beside it keeps pixel_values to itself


def step_encoding(steps_per_video: torch.Tensor, total: int, hidden: int) -> torch.Tensor:
    """Sinusoidal encodings of each step's index within its video, videos one after another: ``[total, hidden]``.

    Computed where ``steps_per_video`` lies, without host synchronisation (``total`` is known from shapes).

    >>> step_encoding(torch.tensor([2, 3]), 5, 2)[:, 0].tolist()  # sin(index): indices 0 1 | 0 1 2
    [0.0, 0.8414709568023682, 0.0, 0.8414709568023682, 0.9092974066734314]
    """
    steps_per_video = steps_per_video.long()
    starts = torch.cumsum(steps_per_video, 0) - steps_per_video
    index = torch.arange(total, device=steps_per_video.device) - torch.repeat_interleave(
        starts, steps_per_video, output_size=total)
    rates = torch.pow(10000.0, -torch.arange(0, hidden, 2, device=index.device, dtype=torch.float32) / hidden)
    angles = index[:, None].float() * rates  # [total, ceil(hidden / 2)]
    return torch.stack([angles.sin(), angles.cos()], -1).flatten(1)[:, :hidden]


class TemporalPooling(ConfiguredCallback):
    """``postprocess_module_callback``: the features of each ``frames`` consecutive frames averaged into one step.

    Frames come video after video, each video's padded to a multiple of ``frames`` by :class:`VideoFramesProcessor`,
    so the groups never straddle two videos and pooling is one reshape and mean (no host synchronisation).

    With ``time_encoding``, each step's features also get the sinusoidal encoding of its index within its video
    (``sin``/``cos`` of ``index / 10000^(2j/hidden)``, as the Transformer's positions): an image tower sees one frame
    at a time, so without it a step's features do not say which step of the video they are.

    Args:
        frames: frames per step (1 keeps every frame's features).
        time_encoding: add each step's index encoding (needs ``video_frames`` among the inputs).

    Raises:
        ValueError: for ``frames`` < 1; when called, if the frame count is not a multiple of ``frames`` (the
            processor's ``pool`` differs).

    >>> pool = TemporalPooling(2)
    >>> pool({}, (torch.arange(8.).reshape(4, 1, 2),))[0].tolist()  # 4 frames, 1 token of width 2
    [[[1.0, 2.0]], [[5.0, 6.0]]]
    >>> pool.recount_features([3, 3, 3, 3, 3, 3], {"video_frames": torch.tensor([2, 4])})  # per video
    [3, 6]
    """

    input_names = frozenset({FRAMES})
    varies_per_item = True  # a video's count depends on its frame count

    def __init__(self, frames: int = 2, time_encoding: bool = False):
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise ValueError(f"frames must be an integer >= 1, got {frames!r}.")
        self.frames, self.time_encoding = frames, bool(time_encoding)

    def get_config(self) -> dict[str, Any]:
        return {"frames": self.frames, "time_encoding": self.time_encoding}

    def __call__(self, inputs: dict[str, Any], output: Any) -> tuple[torch.Tensor]:
        features = output[0]  # [all frames, tokens, hidden]
        if features.shape[0] % self.frames:
            raise ValueError(f"{features.shape[0]} frames cannot be pooled {self.frames} at a time: give the video "
                             f"processor pool={self.frames}.")
        steps = features.reshape(-1, self.frames, *features.shape[1:]).mean(1)  # [all steps, tokens, hidden]
        if self.time_encoding:
            steps = steps + step_encoding(inputs[FRAMES] // self.frames, steps.shape[0], steps.shape[-1]).to(
                steps.dtype)[:, None, :]
        return (steps,)

    def recount_features(self, counts: list[int], outputs: dict[str, Any]) -> list[int]:
        """Per-frame counts → per-video counts: each video's frames' features divided by ``frames``."""
        per_video = torch.as_tensor(outputs[FRAMES]).tolist()
        bounds = np.cumsum([0, *per_video])
        return [sum(counts[a:b]) // self.frames for a, b in zip(bounds[:-1], bounds[1:])]


mean_of_frame_pairs = TemporalPooling(2)  # ready to name in a config: "cornstarch.models.video:mean_of_frame_pairs"
timed_frame_pairs = TemporalPooling(2, time_encoding=True)  # the same, each step marked with its index in the video


class MergedStepPooling(ConfiguredCallback):
    """``postprocess_module_callback`` of a Qwen2-VL / Qwen2.5-VL tower fed videos: the merger's features, optionally
    averaged into one feature per time step, layer-normalised and marked with their time step's index.

    - ``pool``: each time step's merged features averaged into one, so a video of ``t`` steps gives ``t`` features
      whatever its frame size (the tower still sees every patch at its own resolution, attending across the video).
    - ``normalize``: each feature layer-normalised, without parameters. A small tower trained from scratch gives
      merged features far smaller than the language model's token embeddings, and nearly the same for every token;
      normalised, they start at the scale of the embeddings (as a CLIP tower's ``post_layernorm`` output does).
    - ``time_encoding``: each feature gets the sinusoidal encoding of its time step's index within its video (as
      :class:`TemporalPooling`), so the language model can tell the steps apart by content, not only by position.

    The step boundaries come from ``grid_thw`` (one host read of the step count per batch).

    Args:
        merge_size: the tower's ``spatial_merge_size``.
        time_encoding: add each feature's step index encoding.
        normalize: layer-normalise each feature (before the index encoding).
        pool: one feature per step (else every merged feature is kept).

    Raises:
        ValueError: for ``merge_size`` < 1.

    >>> pool = MergedStepPooling()
    >>> out = type("Out", (), {"pooler_output": torch.arange(10.).reshape(5, 2)})()
    >>> pool({"grid_thw": torch.tensor([[1, 2, 2], [2, 2, 4]])}, out)[0].tolist()  # 1 step of 1, 2 steps of 2
    [[0.0, 1.0], [3.0, 4.0], [7.0, 8.0]]
    >>> pool.recount_features([1, 4], {"video_grid_thw": torch.tensor([[1, 2, 2], [2, 2, 4]])})
    [1, 2]
    """

    varies_per_item = True  # a video's count is its number of steps

    def __init__(self, merge_size: int = 2, time_encoding: bool = False, normalize: bool = False,
                 pool: bool = True):
        if isinstance(merge_size, bool) or not isinstance(merge_size, int) or merge_size < 1:
            raise ValueError(f"merge_size must be an integer >= 1, got {merge_size!r}.")
        self.merge_size, self.time_encoding, self.normalize, self.pool = (merge_size, bool(time_encoding),
                                                                          bool(normalize), bool(pool))

    def get_config(self) -> dict[str, Any]:
        return {"merge_size": self.merge_size, "time_encoding": self.time_encoding, "normalize": self.normalize,
                "pool": self.pool}

    def __call__(self, inputs: dict[str, Any], output: Any) -> tuple[torch.Tensor]:
        features = output.pooler_output if hasattr(output, "pooler_output") else output[0]  # [Σ t·h·w/m², hidden]
        grid = inputs.get("grid_thw", inputs.get("video_grid_thw")).to(features.device).long()  # [videos, 3]
        per_step = grid[:, 1] * grid[:, 2] // self.merge_size**2  # features per step, per video
        steps = grid[:, 0]
        total = int(steps.sum())
        sizes = torch.repeat_interleave(per_step, steps, output_size=total)  # [total steps]
        index = torch.repeat_interleave(torch.arange(total, device=features.device), sizes,
                                        output_size=features.shape[0])
        if self.pool:
            pooled = features.new_zeros(total, features.shape[-1]).index_add_(0, index, features)
            pooled = pooled / sizes[:, None].to(pooled.dtype)
        else:
            pooled = features
        if self.normalize:
            pooled = torch.nn.functional.layer_norm(pooled, pooled.shape[-1:])
        if self.time_encoding:
            encoding = step_encoding(steps, total, pooled.shape[-1]).to(pooled.dtype)
            pooled = pooled + (encoding if self.pool else encoding[index])
        return (pooled,)

    def recount_features(self, counts: list[int], outputs: dict[str, Any]) -> list[int]:
        """Per-video counts → each video's number of steps."""
        if not self.pool:
            return counts
        return torch.as_tensor(outputs["video_grid_thw"])[:, 0].tolist()


merged_steps = MergedStepPooling()  # "cornstarch.models.video:merged_steps" in a config
timed_merged_steps = MergedStepPooling(time_encoding=True)  # the same, each step marked with its index
normed_timed_steps = MergedStepPooling(time_encoding=True, normalize=True)  # one normalised, indexed feature per step
normed_timed_patches = MergedStepPooling(time_encoding=True, normalize=True, pool=False)  # every merged feature so
normed_patches = MergedStepPooling(normalize=True, pool=False)  # every merged feature, normalised only
