"""Ready-made encoder callbacks that pick which hidden states become modality features.

They are module-level functions, so a model using them saves and loads without extra arguments.

Llava's default (``vision_feature_layer=-2``, ``vision_feature_select_strategy="default"``), computing only the
layers it needs (the encoder is truncated after layer -2):

>>> from cornstarch.models.multimodal_language_model import ModalEncoderModule
>>> # ModalEncoderModule(clip, feature_layer=-2, postprocess_module_callback=without_cls)

The same features from the whole encoder (every layer computed; the reference page's way):

>>> # ModalEncoderModule(clip, preprocess_callback=request_hidden_states,
>>> #                    postprocess_module_callback=penultimate_layer_without_cls)
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
