"""How many feature vectors an encoder yields per item, known from its config and the processed input shapes.

The data layer uses these counts on the CPU to expand each placeholder to as many tokens as its item yields
features, so the model never has to count. Families in :data:`BUILTIN_COUNTS` are counted from their config;
callbacks that change the count declare it with :func:`changes_feature_count`. Any other encoder is measured:
:class:`MeasuredCount` runs it (callbacks and projector included) on one item of each input shape it meets, once,
and caches the count.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .dynamic_resolution import DYNAMIC_COUNTS

CountFunction = Callable[[dict, dict], "list[int] | list[list[int]]"]


def changes_feature_count(change: Callable[[int], int]) -> Callable:
    """Decorator declaring how a callback changes the number of features per item.

    >>> @changes_feature_count(lambda n: n - 1)
    ... def drop_first(inputs, output):
    ...     return (output[0][:, 1:],)
    >>> drop_first.count_features(17)
    16
    """

    def mark(callback: Callable) -> Callable:
        callback.count_features = change
        return callback

    return mark


def _patches(config: Any, pixel_values: torch.Tensor) -> int:
    height, width = pixel_values.shape[-2:]
    patch = config.patch_size
    return (height // patch) * (width // patch)


def _conv_stride2(frames: int) -> int:
    return (frames - 1) // 2 + 1  # kernel 3, padding 1, stride 2


def _per_item(n_items: int, count: int) -> list[int]:
    return [count] * n_items


def _pixels(outputs: dict) -> torch.Tensor:
    """Images' ``pixel_values``, or a video processor's frames (``pixel_values_videos``), which count as images."""
    return outputs["pixel_values"] if "pixel_values" in outputs else outputs["pixel_values_videos"]


def _vision_with_cls(config: Any, outputs: dict) -> list[int]:
    pixel_values = _pixels(outputs)
    extra = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
    return _per_item(pixel_values.shape[0], _patches(config, pixel_values) + extra)


def _vision_no_cls(config: Any, outputs: dict) -> list[int]:
    pixel_values = _pixels(outputs)
    if pixel_values.dim() == 3:  # already patches [n, max_patches, channels * patch²] (SigLIP2's NaFlex input)
        return _per_item(pixel_values.shape[0], pixel_values.shape[1])
    return _per_item(pixel_values.shape[0], _patches(config, pixel_values))


def _whisper(config: Any, outputs: dict) -> list[int]:
    features = outputs["input_features"]  # [n, mel, frames]
    return _per_item(features.shape[0], _conv_stride2(features.shape[-1]))


def _qwen2_audio(config: Any, outputs: dict) -> list[int]:
    features = outputs["input_features"]  # [n, mel, frames]; conv stride 2, then average pooling by 2
    return _per_item(features.shape[0], (_conv_stride2(features.shape[-1]) - 2) // 2 + 1)


# model_type of the encoder config → count function (config, processor outputs) → features per item.
BUILTIN_COUNTS: dict[str, Callable[[Any, dict], list[int]]] = {
    "clip_vision_model": _vision_with_cls,
    "vit": _vision_with_cls,
    "dinov2": _vision_with_cls,
    "dinov2_with_registers": _vision_with_cls,
    "siglip_vision_model": _vision_no_cls,
    "whisper": _whisper,
    "qwen2_audio_encoder": _qwen2_audio,
    **DYNAMIC_COUNTS,  # variable-resolution towers (cornstarch.models.dynamic_resolution)
}


def flatten_counts(counts: "list[int] | list[list[int]]") -> list[int]:
    """Per-item counts from a flat list or a per-sample nested list.

    >>> flatten_counts([[3, 3], [], [5]])
    [3, 3, 5]
    """
    flat: list[int] = []
    for c in counts:
        flat.extend(c if isinstance(c, (list, tuple)) else [c])
    return [int(c) for c in flat]


class MeasuredCount:
    """Features per item of any encoder, measured: the ``ModalEncoderModule`` runs (without gradients, its modules
    in eval mode) on the first item of each distinct input shape, and the count is cached for that shape.

    Every item of a processed batch has the same shape (padded), hence the same count. Measuring runs the encoder
    where its parameters are, in the process that calls the processor, once per input shape.

    Args:
        encoder: the ``ModalEncoderModule`` (with its projector and callbacks).

    >>> from transformers import ConvNextConfig, ConvNextModel
    >>> from cornstarch.models.multimodal_language_model import ModalEncoderModule, MultimodalProjector
    >>> from cornstarch.models.multimodal_language_model import MultimodalProjectorConfig
    >>> convnext = ConvNextModel(ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2))
    >>> encoder = ModalEncoderModule(convnext, MultimodalProjector(MultimodalProjectorConfig(16, 8)))
    >>> MeasuredCount(encoder)({}, {"pixel_values": torch.zeros(3, 3, 32, 32)})  # 32 / 4 / 2 = 4: 4 x 4 per image
    [16, 16, 16]
    """

    def __init__(self, encoder: Any):
        self.encoder = encoder
        self._cache: dict[tuple, int] = {}

    def __call__(self, inputs: dict, outputs: dict) -> list[int]:
        names = self.encoder.input_names
        tensors = {k: v for k, v in outputs.items() if k in names and isinstance(v, torch.Tensor) and v.dim() > 0}
        if not tensors:
            raise ValueError(f"Cannot measure the feature count: none of the processor outputs {sorted(outputs)} is "
                             f"an input of the encoder ({sorted(names)}).")
        n_items = next(iter(tensors.values())).shape[0]
        shape = tuple((k, tuple(v.shape[1:]), v.dtype) for k, v in sorted(tensors.items()))
        if shape not in self._cache:
            self._cache[shape] = self._measure({k: v[:1] for k, v in tensors.items()})
        return [self._cache[shape]] * n_items

    def _measure(self, item: dict[str, torch.Tensor]) -> int:
        reference = next((p for p in self.encoder.parameters() if p.is_floating_point()), None)
        if reference is not None:
            item = {k: v.to(reference.device, reference.dtype if v.is_floating_point() else v.dtype)
                    for k, v in item.items()}
        modes = [(m, m.training) for m in self.encoder.modules()]
        self.encoder.eval()
        try:
            with torch.no_grad():
                return int(self.encoder(**item).shape[0])  # [n_features, hidden] for one item
        finally:
            for module, mode in modes:
                module.training = mode


class FeatureCounter:
    """Features per item for one encoder: its family's count, then each callback's declared change; or, for a
    family without a built-in count, measured (:class:`MeasuredCount`).

    Args:
        config: the encoder's Hugging Face config (its ``model_type`` picks the built-in count).
        callbacks: the encoder's callbacks in order; those with a ``count_features`` attribute change each item's
            count, those with ``recount_features(counts, outputs)`` change the counts knowing the processor
            outputs (e.g. Llava-Next's, from each image's size).
        encoder: the ``ModalEncoderModule``, to measure a family with no built-in count.

    Attributes:
        varies: whether the count depends on each item's size (variable-resolution towers) or frame count (a
            callback with ``varies_per_item``, such as video's temporal pooling), so that no single item tells the
            count of the others.

    Raises:
        ValueError: for a family with no built-in count and no ``encoder`` (pass ``num_feature_calculation_funcs``
            then).
    """

    def __init__(self, config: Any, callbacks: list[Callable] | tuple = (), encoder: Any = None):
        model_type = getattr(config, "model_type", None)
        self.config = config
        self.measured = model_type not in BUILTIN_COUNTS
        if self.measured and encoder is None:
            raise ValueError(
                f"No built-in feature count for encoder type {model_type!r} (known: {', '.join(sorted(BUILTIN_COUNTS))}) "
                "and no encoder to measure it on: give the processor model=..., or "
                "num_feature_calculation_funcs={key: fn(inputs, outputs) -> list[int]}."
            )
        self._count = MeasuredCount(encoder) if self.measured else BUILTIN_COUNTS[model_type]
        # items yield as many features as their resolution (or, for videos, their frame count) gives
        self.varies = model_type in DYNAMIC_COUNTS or any(getattr(cb, "varies_per_item", False) for cb in callbacks)
        # the callbacks that change counts, in order (a measured count already went through them)
        self.callbacks = [] if self.measured else [
            cb for cb in callbacks if cb is not None and (hasattr(cb, "count_features") or hasattr(cb, "recount_features"))]

    def __call__(self, inputs: dict, outputs: dict) -> list[int]:
        counts = self._count(inputs, outputs) if self.measured else self._count(self.config, outputs)
        for callback in self.callbacks:
            if hasattr(callback, "count_features"):
                counts = [callback.count_features(c) for c in counts]
            if hasattr(callback, "recount_features"):
                counts = callback.recount_features(counts, outputs)
        return counts
