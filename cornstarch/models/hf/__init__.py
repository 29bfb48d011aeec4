"""Import and export of transformers' native multimodal classes.

``MultimodalModel.from_hf`` / ``to_hf`` and ``MultimodalProcessor.from_hf`` / ``to_hf`` dispatch here. Each native
family is one module of this package, listed once in :data:`FAMILIES`; each module defines ``NATIVE`` (the model
class), ``PROCESSOR`` (the processor class) and the functions ``import_model``, ``export_model``, ``claims_model``,
``import_processor``, ``export_processor`` and ``claims_processor``.

Conversions share modules rather than copy them: ``MultimodalModel.from_hf(llava)`` and ``llava`` hold the same
parameters (load from a directory, or ``copy.deepcopy``, to keep them apart).
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

from transformers import AutoConfig, AutoProcessor, PreTrainedModel

from ..multimodal_language_model import MultimodalModel, MultimodalProcessor
from . import llava, llava_next, qwen2_audio

# Families in the order they are tried when exporting (the more specific first).
FAMILIES: tuple[ModuleType, ...] = (llava_next, qwen2_audio, llava)


def _names(attribute: str) -> str:
    return ", ".join(getattr(family, attribute).__name__ for family in FAMILIES)


def family_of_model(native: Any) -> ModuleType:
    """The family module whose native class ``native`` is.

    Raises:
        ValueError: for any other class.
    """
    for family in FAMILIES:
        if isinstance(native, family.NATIVE):
            return family
    raise ValueError(f"{type(native).__name__} is no supported native class; supported: {_names('NATIVE')}.")


def load_model(source: Any, **from_pretrained_kwargs: Any) -> PreTrainedModel:
    """``source`` itself if it is a model; else the native class its ``config.json`` names, loaded from it.

    Raises:
        ValueError: for a config whose ``model_type`` no family handles.
    """
    if isinstance(source, PreTrainedModel):
        return source
    model_type = AutoConfig.from_pretrained(os.fspath(source)).model_type
    for family in FAMILIES:
        if family.NATIVE.config_class.model_type == model_type:
            return family.NATIVE.from_pretrained(os.fspath(source), **from_pretrained_kwargs)
    raise ValueError(f"{source!s} holds a {model_type!r} model; supported: {_names('NATIVE')}.")


def model_from_hf(source: Any, drop_unused_layers: bool = False, **from_pretrained_kwargs: Any) -> MultimodalModel:
    """See :meth:`MultimodalModel.from_hf`."""
    native = load_model(source, **from_pretrained_kwargs)
    return family_of_model(native).import_model(native, drop_unused_layers=drop_unused_layers)


def model_to_hf(mllm: MultimodalModel) -> PreTrainedModel:
    """See :meth:`MultimodalModel.to_hf`."""
    if len(mllm.encoders) != 1:
        raise ValueError(f"The native classes hold one encoder; this model has {len(mllm.encoders)}: "
                         f"{list(mllm.encoders)}.")
    for family in FAMILIES:
        if family.claims_model(mllm):
            return family.export_model(mllm)
    key, encoder = next(iter(mllm.encoders.items()))
    raise ValueError(f"No native class holds a {type(encoder.module).__name__} {key} encoder; supported: "
                     f"{_names('NATIVE')}.")


def processor_from_hf(source: Any, model: MultimodalModel | None = None) -> MultimodalProcessor:
    """See :meth:`MultimodalProcessor.from_hf`."""
    native = AutoProcessor.from_pretrained(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else source
    for family in FAMILIES:
        if isinstance(native, family.PROCESSOR):
            return family.import_processor(native, model=model)
    raise ValueError(f"{type(native).__name__} is no supported native processor; supported: {_names('PROCESSOR')}.")


def processor_to_hf(processor: MultimodalProcessor) -> Any:
    """See :meth:`MultimodalProcessor.to_hf`."""
    if len(processor.encoder_processors) != 1:
        raise ValueError(f"The native processors hold one encoder processor; this processor has "
                         f"{len(processor.encoder_processors)}: {list(processor.encoder_processors)}.")
    for family in FAMILIES:
        if family.claims_processor(processor):
            return family.export_processor(processor)
    key, encoder_processor = next(iter(processor.encoder_processors.items()))
    raise ValueError(f"No native processor holds a {type(encoder_processor).__name__} for {key}; supported: "
                     f"{_names('PROCESSOR')}.")


__all__ = ["FAMILIES", "family_of_model", "load_model", "model_from_hf", "model_to_hf", "processor_from_hf",
           "processor_to_hf"]
