"""Pieces shared by the conversions between :class:`MultimodalModel` and transformers' native multimodal classes.

Conversions move modules, they do not copy them: the model a conversion returns shares its parameters with the
one it was given (a 7B model is never held twice). Native classes are assembled on the ``meta`` device and then
given the real modules, so nothing is initialised in vain.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

from ..multimodal_language_model import (
    ModalEncoderModule,
    MultimodalModel,
    MultimodalProjector,
    MultimodalProjectorConfig,
)

# Config fields of LMs whose causal-LM forward changes the logits after the head (a native multimodal class
# applies its own head only, so it would give other logits).
HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def materialized(module: nn.Module, what: str) -> nn.Module:
    """``module``, checked to hold no ``meta`` parameter or buffer left from assembling it.

    Raises:
        ValueError: naming the first such tensor (a part of ``what`` that the conversion does not fill).
    """
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_meta:
            raise ValueError(f"The {what} has a part without weights after conversion: {name}.")
    return module


def assemble(native_class: type[PreTrainedModel], config: Any, parts: Mapping[str, nn.Module | nn.Parameter],
             generation_config: Any = None) -> PreTrainedModel:
    """A ``native_class`` built on the ``meta`` device whose submodules (dotted paths) are then set to ``parts``.

    Raises:
        ValueError: if some parameter or buffer is not covered by ``parts``.
    """
    with torch.device("meta"):
        native = native_class(config)
    for path, part in parts.items():
        parent_path, _, name = path.rpartition(".")
        setattr(native.get_submodule(parent_path) if parent_path else native, name, part)
    if generation_config is not None:
        native.generation_config = copy.deepcopy(generation_config)
    return materialized(native, native_class.__name__)


# ----------------------------------------------------------------------------------------------- language model
def causal_lm(decoder: nn.Module, head: nn.Module, generation_config: Any = None) -> PreTrainedModel:
    """The causal LM transformers builds for ``decoder.config``, holding ``decoder`` and ``head`` (shared).

    Raises:
        ValueError: if transformers has no causal LM for the decoder's config.
    """
    config = decoder.config
    cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if cls is None:
        raise ValueError(f"transformers has no causal LM class for {type(config).__name__}; the language model "
                         "cannot become a MultimodalModel's language_model.")
    with torch.device("meta"):
        lm = cls(config)
    setattr(lm, lm.base_model_prefix, decoder)
    lm.lm_head = head
    if generation_config is not None:
        lm.generation_config = copy.deepcopy(generation_config)
    return materialized(lm, "language model")


def decoder_and_head(lm: nn.Module, native: str) -> tuple[nn.Module, nn.Linear]:
    """The bare decoder and the bias-free linear head of a causal LM, as a native multimodal class holds them.

    Raises:
        ValueError: for LoRA adapters not merged, an LM that is not the causal-LM class transformers builds for its
            config, a head that is not a bias-free ``nn.Linear``, or an LM that changes its logits after the head.
    """
    if hasattr(lm, "merge_and_unload"):
        raise ValueError(f"The language model carries LoRA adapters, which {native} cannot hold; merge them first "
                         "(mllm.language_model = mllm.language_model.merge_and_unload()).")
    config = lm.config
    expected = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if type(lm) is not expected:
        raise ValueError(f"The language model is a {type(lm).__name__}; {native} holds the causal LM transformers "
                         f"builds for {type(config).__name__} ({getattr(expected, '__name__', 'none')}).")
    decoder = getattr(lm, lm.base_model_prefix)
    if type(decoder) is not MODEL_MAPPING.get(type(config), None):
        raise ValueError(f"The language model's decoder is a {type(decoder).__name__}, which {native} cannot hold.")
    head = lm.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise ValueError(f"The language model's head is {type(head).__name__}"
                         f"{' with a bias' if isinstance(head, nn.Linear) else ''}; {native} has a bias-free linear head.")
    extras = [name for name in HEAD_EXTRAS if getattr(config, name, None) not in (None, 1, 1.0)]
    if extras:
        raise ValueError(f"The language model changes its logits after the head ({', '.join(extras)}), which "
                         f"{native} does not do.")
    owned = {id(p) for p in decoder.parameters()} | {id(p) for p in head.parameters()}
    stray = [n for n, p in lm.named_parameters() if id(p) not in owned]
    if stray:
        raise ValueError(f"The language model has parameters outside its decoder and head ({stray[0]}, ...), which "
                         f"{native} cannot hold.")
    return decoder, head


def token_in_vocabulary(mllm: MultimodalModel, key: str, native: str) -> int:
    """The placeholder token id of modality ``key``, which a native class looks up in the LM's embeddings.

    Raises:
        ValueError: if the id was never set or lies outside the LM's vocabulary.
    """
    token_id = mllm.modality_token_ids.get(key)
    if token_id is None:
        raise ValueError(f"The {key} modality has no token id; set it (MultimodalProcessor(..., model=mllm) does).")
    vocab = mllm.language_model.get_input_embeddings().num_embeddings
    if not 0 <= token_id < vocab:
        raise ValueError(f"The {key} token id {token_id} lies outside the language model's vocabulary ({vocab}); "
                         f"{native} embeds it, so grow the embeddings first "
                         f"(mllm.language_model.resize_token_embeddings({token_id + 1})).")
    return token_id


# ----------------------------------------------------------------------------------------------- encoders
def multimodal_model(native: PreTrainedModel, key: str, encoder: ModalEncoderModule, token_id: int) -> MultimodalModel:
    """The :class:`MultimodalModel` of one encoder and the native model's decoder and head (shared)."""
    inner = native.model
    mllm = MultimodalModel({key: encoder}, causal_lm(inner.language_model, native.lm_head, native.generation_config))
    mllm.set_modality_token_ids({key: token_id})
    return mllm


def the_encoder(mllm: MultimodalModel, native: str) -> tuple[str, ModalEncoderModule, nn.Module]:
    """The model's one encoder: its key, the :class:`ModalEncoderModule` and its tower, checked to be the model
    transformers builds for the tower's config (what a native class holds).

    Raises:
        ValueError: naming the encoders when there is not exactly one, or the tower's class.
    """
    if len(mllm.encoders) != 1:
        raise ValueError(f"{native} holds one encoder; this model has {len(mllm.encoders)}: {list(mllm.encoders)}.")
    key, encoder = next(iter(mllm.encoders.items()))
    module = encoder.module
    config = getattr(module, "config", None)
    expected = MODEL_MAPPING.get(type(config), None) if config is not None else None
    if type(module) is not expected:
        raise ValueError(f"The {key} encoder is a {type(module).__name__}; {native} holds the model transformers "
                         f"builds for its config ({getattr(expected, '__name__', 'none')}).")
    return key, encoder, module


def no_callback(encoder: ModalEncoderModule, key: str, native: str, *names: str) -> None:
    """Raise a ``ValueError`` naming the first of the callbacks ``names`` that is set (``native`` has none)."""
    for name in names:
        callback = getattr(encoder, name)
        if callback is not None:
            raise ValueError(f"The {key} encoder's {name} {getattr(callback, '__name__', callback)!r} has no "
                             f"equivalent in {native}.")


def projector_of(layers: list[nn.Linear], activation: str | None = None) -> MultimodalProjector:
    """A :class:`MultimodalProjector` holding a native projector's linear layers (shared): one layer is
    ``"linear"``, two with an activation between are ``"mlp"``.

    Raises:
        ValueError: for layers without bias (the projector's layers have one).
    """
    if any(layer.bias is None for layer in layers):
        raise ValueError("The native projector's layers have no bias; a MultimodalProjector's layers have one.")
    kind = "linear" if len(layers) == 1 else "mlp"
    config = MultimodalProjectorConfig(in_features=layers[0].in_features, out_features=layers[-1].out_features,
                                       projection_type=kind, activation=activation or "gelu")
    projection = layers[0] if kind == "linear" else nn.Sequential(layers[0], _activation(activation), layers[1])
    return MultimodalProjector(config, projection=projection)


def _activation(name: str) -> nn.Module:
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def projector_layers(encoder: ModalEncoderModule, key: str, kind: str, native: str) -> tuple[list[nn.Linear], str]:
    """The linear layers (and activation name) of a projector of type ``kind``, as a native class holds them.

    Raises:
        ValueError: for a custom projection or another projection type.
    """
    projector = encoder.projector
    config = projector.config
    if projector.is_custom or config.projection_type != kind:
        what = type(projector.projection).__name__ if projector.is_custom else f"a {config.projection_type!r} projector"
        raise ValueError(f"The {key} projector is {what}; {native} holds a {kind!r} projector "
                         f"({'Linear' if kind == 'linear' else 'Linear → activation → Linear'}).")
    projection = projector.projection
    layers = [projection] if kind == "linear" else [projection[0], projection[2]]
    return layers, config.activation
