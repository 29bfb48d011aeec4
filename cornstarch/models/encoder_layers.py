"""An encoder's stack of layers, found from the model itself, and truncation after a selected layer.

Llava-style models take features from an inner layer (``vision_feature_layer=-2``); computing the layers after it
is wasted work, and their parameters never receive a gradient. ``truncate_after`` keeps only the layers up to
the selected one (and updates the config so the truncated encoder saves and reloads), and ``LayerOutput``
captures that layer's raw output, before any final norm or pooling head the model applies after its layers.

>>> import transformers as tf
>>> clip = tf.CLIPVisionModel(tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
...                                               num_attention_heads=4, image_size=32, patch_size=8))
>>> _ = truncate_after(clip, -2)
>>> clip.config.num_hidden_layers, len(layer_stack(clip)[1])
(2, 2)
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

LAYER_COUNT_FIELDS = ("num_hidden_layers", "encoder_layers", "num_layers")
# Encoders that change the sequence after their layers (pooling): an inner layer has another feature count.
POOLING_AFTER_LAYERS = ("qwen2_audio_encoder",)


def layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's main stack of layers: the longest ``nn.ModuleList`` of a class named in ``_no_split_modules``.

    Returns:
        ``(dotted path, the ModuleList)``.

    Raises:
        ValueError: if the model has no such list.
    """
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    best: tuple[str, nn.ModuleList] | None = None
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and type(module[0]).__name__ in block_names:
            if best is None or len(module) > len(best[1]):
                best = (path, module)
    if best is None:
        raise ValueError(
            f"{type(model).__name__} has no list of layers whose class is named in its _no_split_modules "
            f"({sorted(block_names)}); select features with a postprocess_module_callback instead of feature_layer."
        )
    return best


def truncate_after(model: nn.Module, feature_layer: int) -> str:
    """Drop the layers after ``feature_layer`` (an index into the layer list: -1 the last, -2 the one before).

    The config's layer count is updated, so ``save_pretrained``/``from_pretrained`` rebuild the truncated encoder.

    Returns:
        The dotted path of the (now shorter) layer list, whose last layer is the selected one.

    Raises:
        ValueError: for an index outside ``[-n_layers, -1]``, an encoder that pools after its layers, or a config
            without a layer count.
    """
    path, layers = layer_stack(model)
    n = len(layers)
    if not isinstance(feature_layer, int) or not -n <= feature_layer <= -1:
        raise ValueError(f"feature_layer must be an int in [-{n}, -1] for {type(model).__name__} ({n} layers), "
                         f"got {feature_layer!r}.")
    config = model.config
    if getattr(config, "model_type", None) in POOLING_AFTER_LAYERS:
        raise ValueError(f"{type(model).__name__} pools after its layers, so an inner layer yields another feature "
                         "count; select its features with a postprocess_module_callback.")
    if feature_layer == -1:
        return path
    count_field = next((f for f in LAYER_COUNT_FIELDS if getattr(config, f, None) == n), None)
    if count_field is None:
        raise ValueError(f"{type(config).__name__} has no layer count ({', '.join(LAYER_COUNT_FIELDS)}) equal to "
                         f"{n}; cannot truncate it so that it reloads.")
    keep = n + feature_layer + 1
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, nn.ModuleList(list(layers)[:keep]))
    truncated = copy.deepcopy(config)  # the config object may be shared with other models
    setattr(truncated, count_field, keep)
    for module in model.modules():
        if getattr(module, "config", None) is config:
            module.config = truncated
    return path


class LayerOutput:
    """Context manager capturing a layer's output (element 0 if it returns a tuple) during one forward.

    >>> import transformers as tf
    >>> clip = tf.CLIPVisionModel(tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                               num_attention_heads=4, image_size=32, patch_size=8))
    >>> pixels = torch.randn(2, 3, 32, 32)
    >>> with LayerOutput(layer_stack(clip)[1][0]) as captured:
    ...     out = clip(pixel_values=pixels, output_hidden_states=True)
    >>> captured.value.shape  # [n_items, n_tokens, hidden]
    torch.Size([2, 17, 32])
    >>> torch.equal(captured.value, out.hidden_states[1])  # the first layer's output
    True
    """

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self.value: torch.Tensor | None = None

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self.value = output if isinstance(output, torch.Tensor) else output[0]

    def __enter__(self) -> "LayerOutput":
        self._handle = self.layer.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()
