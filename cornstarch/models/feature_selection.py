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
"""

from __future__ import annotations

from typing import Any

from .feature_counts import changes_feature_count


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
