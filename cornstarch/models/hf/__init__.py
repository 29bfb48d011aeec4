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
    return _export(mllm, {key: encoder.module for key, encoder in mllm.encoders.items()}, "model", "encoder")


def processor_from_hf(source: Any, model: MultimodalModel | None = None) -> MultimodalProcessor:
    """See :meth:`MultimodalProcessor.from_hf`."""
    native = AutoProcessor.from_pretrained(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else source
    for family in FAMILIES:
        if isinstance(native, family.PROCESSOR):
            return family.import_processor(native, model=model)
    raise ValueError(f"{type(native).__name__} is no supported native processor; supported: {_names('PROCESSOR')}.")


def processor_to_hf(processor: MultimodalProcessor) -> Any:
    """See :meth:`MultimodalProcessor.to_hf`."""
    return _export(processor, processor.encoder_processors, "processor", "encoder processor")


def _export(obj: Any, parts: dict[str, Any], kind: str, part: str) -> Any:
    """The native ``kind`` (``"model"`` or ``"processor"``) of the first family that claims ``obj``.

    Raises:
        ValueError: for other than one ``part``, or a part no family holds (naming both).
    """
    if len(parts) != 1:
        raise ValueError(f"The native {kind}s hold one {part}; this {kind} has {len(parts)}: {list(parts)}.")
    for family in FAMILIES:
        if getattr(family, f"claims_{kind}")(obj):
            return getattr(family, f"export_{kind}")(obj)
    key, value = next(iter(parts.items()))
    supported = _names("NATIVE" if kind == "model" else "PROCESSOR")
    raise ValueError(f"No native {kind} holds a {type(value).__name__} as {key} {part}; supported: {supported}.")


__all__ = ["FAMILIES", "family_of_model", "load_model", "model_from_hf", "model_to_hf", "processor_from_hf",
           "processor_to_hf"]
