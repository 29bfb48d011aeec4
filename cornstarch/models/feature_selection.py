"""Ready-made encoder callbacks that pick which hidden states become modality features.

They are module-level functions, so a model using them saves and loads without extra arguments.

Llava's default (``vision_feature_layer=-2``, ``vision_feature_select_strategy="default"``), computing only the
layers it needs (the encoder is truncated after layer -2):

>>> import torch
>>> import transformers as tf
>>> from cornstarch.models.multimodal_language_model import ModalEncoderModule
>>> def clip():  # a small CLIP tower standing in for a hub checkpoint, the same weights each call
...     torch.manual_seed(0)
...     return tf.CLIPVisionModel(tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
...                                                   num_attention_heads=4, image_size=32, patch_size=8))
>>> truncated = ModalEncoderModule(clip(), feature_layer=-2, postprocess_module_callback=without_cls,
...                                projector=torch.nn.Identity())
>>> truncated.module.config.num_hidden_layers  # layer 3 is never computed
2

The same features from the whole encoder (every layer computed; the reference page's way):

>>> whole = ModalEncoderModule(clip(), preprocess_callback=request_hidden_states,
...                            postprocess_module_callback=penultimate_layer_without_cls,
...                            projector=torch.nn.Identity())
>>> pixels = torch.randn(2, 3, 32, 32)
>>> features = truncated(pixel_values=pixels)
>>> features.shape  # 2 images x 16 patches (CLS dropped), hidden 32
torch.Size([32, 32])
>>> torch.allclose(features, whole(pixel_values=pixels), atol=1e-6)
True

Any layer (or several, concatenated) and either strategy, as Llava's config names them, keeping every layer:

>>> select = ModalEncoderModule(clip(), postprocess_module_callback=SelectFeatures(layer=-2, strategy="default"),
...                             projector=torch.nn.Identity())
>>> torch.allclose(select(pixel_values=pixels), features, atol=1e-6)
True
"""

from __future__ import annotations

from typing import Any

import torch

from .callbacks import ConfiguredCallback
from .feature_counts import changes_feature_count

STRATEGIES = ("default", "full")


def request_hidden_states(inputs: dict[str, Any]) -> dict[str, Any]:
    """``preprocess_callback`` asking the encoder for its hidden states (only layer -2 is kept in memory).

    transformers 5 accepts an index for ``output_hidden_states`` and then captures that layer only.

    >>> request_hidden_states({"pixel_values": 1})
    {'pixel_values': 1, 'output_hidden_states': -2}
    """
    return {**inputs, "output_hidden_states": -2}


@changes_feature_count(lambda n: n - 1)
def penultimate_layer_without_cls(inputs: dict[str, Any], output: Any) -> tuple:
    """``postprocess_module_callback`` returning layer -2's hidden states without the CLS token (Llava's default).

    Args:
        inputs: the encoder inputs (unused).
        output: the encoder output, with ``hidden_states``.

    Returns:
        A 1-tuple ``(features [n_items, n_patches, hidden],)``.
    """
    return (output.hidden_states[-2][:, 1:],)


def penultimate_layer(inputs: dict[str, Any], output: Any) -> tuple:
    """``postprocess_module_callback`` returning layer -2's hidden states, CLS kept (Llava's ``"full"``)."""
    return (output.hidden_states[-2],)


@changes_feature_count(lambda n: n - 1)
def without_cls(inputs: dict[str, Any], output: Any) -> tuple:
    """``postprocess_module_callback`` dropping the first (CLS) token of the encoder output's element 0.

    With ``ModalEncoderModule(..., feature_layer=k)`` element 0 is layer ``k``'s output, so this is Llava's
    ``"default"`` strategy on that layer.

    Returns:
        A 1-tuple ``(features [n_items, n_tokens - 1, hidden],)``.
    """
    return ((output if hasattr(output, "shape") else output[0])[:, 1:],)


class SelectFeatures(ConfiguredCallback):
    """``postprocess_module_callback`` selecting vision features as Llava's config says.

    ``layer`` is Llava's ``vision_feature_layer``: an index into the encoder's hidden states (the encoder is asked
    for that layer only), a list of indices whose hidden states are concatenated along the feature axis, or
    ``None`` for element 0 of the encoder output (the encoder's last output, or the layer ``feature_layer=``
    truncated to). ``strategy`` is ``vision_feature_select_strategy``: ``"default"`` drops the first (CLS) token,
    ``"full"`` keeps every token.

    Args:
        layer: ``int``, list of ``int`` or ``None``.
        strategy: ``"default"`` or ``"full"``.

    Raises:
        ValueError: for another strategy or a layer that is no int (or list of ints).

    >>> import transformers as tf
    >>> clip = tf.CLIPVisionModel(tf.CLIPVisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=2,
    ...                                               num_attention_heads=2, image_size=8, patch_size=4))
    >>> select = SelectFeatures(layer=[-2, -1], strategy="default")
    >>> select({}, clip(torch.zeros(1, 3, 8, 8), **select.encoder_kwargs))[0].shape  # 4 patches, 2 layers x 8
    torch.Size([1, 4, 16])
    >>> select.count_features(5)
    4
    """

    def __init__(self, layer: int | list[int] | None = -2, strategy: str = "default"):
        if strategy not in STRATEGIES:
            raise ValueError(f"Unknown strategy {strategy!r}; valid: {', '.join(STRATEGIES)}.")
        layers = [layer] if isinstance(layer, int) or layer is None else list(layer)
        if not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers if i is not None) \
                or (None in layers and len(layers) > 1):
            raise ValueError(f"layer must be an int, a list of ints or None, got {layer!r}.")
        self.layer = layer if isinstance(layer, int) or layer is None else layers
        self.strategy = strategy

    def get_config(self) -> dict[str, Any]:
        return {"layer": self.layer, "strategy": self.strategy}

    @property
    def encoder_kwargs(self) -> dict[str, Any]:
        """``{"output_hidden_states": layer}``: transformers then keeps only the selected layers' hidden states."""
        return {} if self.layer is None else {"output_hidden_states": self.layer}

    def count_features(self, n: int) -> int:
        """Features per item after selection: one fewer with ``"default"`` (the CLS token is dropped)."""
        return n - 1 if self.strategy == "default" else n

    def __call__(self, inputs: dict[str, Any], output: Any) -> tuple:
        if self.layer is None:
            features = output if isinstance(output, torch.Tensor) else output[0]
        elif isinstance(self.layer, int):
            features = output.hidden_states[self.layer]
        else:
            features = torch.cat([output.hidden_states[i] for i in self.layer], dim=-1)
        return (features[:, 1:] if self.strategy == "default" else features,)
