"""Placeholder inputs for an encoder that has nothing to encode in a batch.

Distributed training needs every rank to run every encoder each step: under DDP an encoder skipped on one rank
leaves its gradients unreduced there, and under FSDP a skipped sharded encoder misses the all-gathers the other
ranks wait on. ``MultimodalModel(encode_absent=True)`` then runs such an encoder on one placeholder item built
here and merges zero of its features (so the output is unchanged and the gradients it adds are exactly zero).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .dynamic_resolution import placeholder_item


def _reference(module: nn.Module) -> torch.Tensor | None:
    return next((p for p in module.parameters() if p.is_floating_point()), None)


def dummy_inputs(encoder: nn.Module) -> dict[str, Any]:
    """One placeholder item for a ``ModalEncoderModule``: its ``dummy_inputs`` if set, else from the config.

    Variable-resolution towers get one smallest image in their processor's form
    (:func:`cornstarch.models.dynamic_resolution.placeholder_item`); other vision towers with
    ``image_size``/``num_channels`` get ``pixel_values [1, channels, size, size]`` (video towers with
    ``num_frames``: ``[1, frames, channels, size, size]``); audio
    encoders with ``num_mel_bins``/``max_source_positions`` (Whisper, Qwen2-Audio) get
    ``input_features [1, mel_bins, 2 * max_source_positions]``. Values are zeros, on the encoder's device and
    floating dtype.

    Args:
        encoder: the ``ModalEncoderModule``; a ``dummy_inputs`` attribute (a dict, or a callable returning one)
            overrides the config-based inputs (e.g. for callbacks that need ``image_sizes``).

    Returns:
        Keyword arguments for ``encoder(**inputs)``.

    Raises:
        ValueError: for an encoder whose config says neither, and that has no ``dummy_inputs``.

    >>> from transformers import CLIPVisionConfig, CLIPVisionModel
    >>> from cornstarch.models.multimodal_language_model import ModalEncoderModule
    >>> clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                                         num_attention_heads=4, image_size=8, patch_size=2))
    >>> dummy_inputs(ModalEncoderModule(clip))["pixel_values"].shape
    torch.Size([1, 3, 8, 8])
    """
    given = getattr(encoder, "dummy_inputs", None)
    if given is not None:
        return dict(given() if callable(given) else given)
    module = encoder.module
    config = getattr(module, "config", None)
    reference = _reference(module)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None else torch.float32
    names = encoder.input_names
    placeholder = placeholder_item(config, device, dtype)  # variable-resolution towers
    if placeholder is not None:
        if "video_grid_thw" in names and "image_grid_thw" not in names:  # fed videos: the same block as a video
            placeholder = {"pixel_values_videos": placeholder["pixel_values"],
                           "video_grid_thw": placeholder["image_grid_thw"]}
        return placeholder
    image_size = getattr(config, "image_size", None)
    if "video_frames" in names and image_size is not None:  # an image tower fed frames: one step of zero frames
        from .video import frame_placeholder

        return frame_placeholder(encoder, config, device, dtype)
    video = next((n for n in ("pixel_values_videos",) if n in names), None)
    if ("pixel_values" in names or video) and image_size is not None:
        h, w = image_size if isinstance(image_size, (tuple, list)) else (image_size, image_size)
        shape = (getattr(config, "num_channels", 3), h, w)
        frames = getattr(config, "num_frames", None)
        if frames:  # a video tower: [1, frames, channels, h, w]
            shape = (frames, *shape)
        return {video or "pixel_values": torch.zeros(1, *shape, device=device, dtype=dtype)}
    mel_bins, positions = getattr(config, "num_mel_bins", None), getattr(config, "max_source_positions", None)
    if "input_features" in names and mel_bins is not None and positions is not None:
        return {"input_features": torch.zeros(1, mel_bins, 2 * positions, device=device, dtype=dtype)}
    raise ValueError(
        f"Cannot build a placeholder input for the {type(module).__name__} encoder (needed when a distributed rank's "
        "batch lacks this modality): set encoder.dummy_inputs = {<argument>: <tensor of one item>} on its "
        "ModalEncoderModule."
    )
