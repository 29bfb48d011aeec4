"""How many feature vectors an encoder yields per item, known from its config and the processed input shapes.

The data layer uses these counts on the CPU to expand each placeholder to as many tokens as its item yields
features, so the model never has to count. Callbacks that change the count declare it with
:func:`changes_feature_count`.
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


def _vision_with_cls(config: Any, outputs: dict) -> list[int]:
    pixel_values = outputs["pixel_values"]
    extra = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
    return _per_item(pixel_values.shape[0], _patches(config, pixel_values) + extra)


def _vision_no_cls(config: Any, outputs: dict) -> list[int]:
    pixel_values = outputs["pixel_values"]
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


class FeatureCounter:
    """Features per item for one encoder: its family's count, then each callback's declared change.

    Args:
        config: the encoder's Hugging Face config (its ``model_type`` picks the built-in count).
        callbacks: the encoder's callbacks in order; those with a ``count_features`` attribute change each item's
            count, those with ``recount_features(counts, outputs)`` change the counts knowing the processor
            outputs (e.g. Llava-Next's, from each image's size).

    Attributes:
        varies: whether the count depends on each item's size (variable-resolution towers), so that no single
            item tells the count of the others.

    Raises:
        ValueError: for a family with no built-in count (pass ``num_feature_calculation_funcs`` then).
    """

    def __init__(self, config: Any, callbacks: list[Callable] | tuple = ()):
        model_type = getattr(config, "model_type", None)
        if model_type not in BUILTIN_COUNTS:
            raise ValueError(
                f"No built-in feature count for encoder type {model_type!r} (known: {', '.join(sorted(BUILTIN_COUNTS))}); "
                "pass num_feature_calculation_funcs={key: fn(inputs, outputs) -> list[int]}."
            )
        self.config = config
        self._count = BUILTIN_COUNTS[model_type]
        self.varies = model_type in DYNAMIC_COUNTS  # items yield as many features as their resolution gives
        # the callbacks that change counts, in order
        self.callbacks = [cb for cb in callbacks
                          if cb is not None and (hasattr(cb, "count_features") or hasattr(cb, "recount_features"))]

    def __call__(self, inputs: dict, outputs: dict) -> list[int]:
        counts = self._count(self.config, outputs)
        for callback in self.callbacks:
            if hasattr(callback, "count_features"):
                counts = [callback.count_features(c) for c in counts]
            if hasattr(callback, "recount_features"):
                counts = callback.recount_features(counts, outputs)
        return counts
