"""Saving and loading a composite model: one directory with ``config.json`` and ``model.safetensors``.

``config.json`` names each part's class and config, the projectors, importable callbacks and token ids
(:class:`MultimodalModelConfig`); the weights are one safetensors file. Parts are rebuilt from their configs without
initialising weights, then loaded strictly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import GenerationConfig
from transformers.initialization import no_init_weights

from .configuration_multimodal_language_model import MultimodalModelConfig, MultimodalProjectorConfig
from .encoder_module import CALLBACK_NAMES, ModalEncoderModule
from .import_paths import UNSERIALIZABLE, build_callback, callback_spec, import_path, resolve
from .projector import MultimodalProjector

WEIGHTS_NAME = "model.safetensors"


def _dtype_name(module: nn.Module) -> str | None:
    param = next((p for p in module.parameters() if p.is_floating_point()), None)
    return None if param is None else str(param.dtype).removeprefix("torch.")



def _part_spec(module: nn.Module) -> dict[str, Any]:
    config = module.config
    return {
        "model_class": import_path(type(module)),
        "config_class": import_path(type(config)),
        "config": config.to_dict(),
        "dtype": _dtype_name(module),
    }


def _build_part(spec: dict[str, Any], what: str) -> nn.Module:
    if UNSERIALIZABLE in (spec["model_class"], spec["config_class"]):
        raise ValueError(f"The saved {what} names a class that cannot be imported ({spec['model_class']}).")
    config = resolve(spec["config_class"]).from_dict(spec["config"])
    module = resolve(spec["model_class"])(config)
    if hasattr(module, "tie_weights"):  # no_init_weights() also skips tying (GPT-2, Gemma share embeddings)
        module.tie_weights()
    return module.to(getattr(torch, spec["dtype"])) if spec.get("dtype") else module



def _encoder_kwargs(key: str, spec: Mapping[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """ModalEncoderModule arguments for a saved encoder: the given ones, else the saved projector and callbacks."""
    kwargs = dict(given)
    kwargs.setdefault("feature_layer", spec.get("feature_layer"))
    for name, saved in spec.get("callbacks", {}).items():
        if name in kwargs:
            continue
        if saved == UNSERIALIZABLE:
            raise ValueError(
                f"The {key} encoder was saved with a {name} that is not an importable module-level function; pass "
                f"it again: from_pretrained(..., encoders_kwargs={{{key!r}: {{{name!r}: fn}}}})."
            )
        kwargs[name] = build_callback(saved)  # a callback module's parameters load with the model's weights
    if "projector" not in kwargs:
        projector_config = MultimodalProjectorConfig.from_dict(spec["projector"])
        if spec.get("custom_projection"):
            raise ValueError(
                f"The {key} projector wraps a custom module ({spec['custom_projection']}); pass it again: "
                f"from_pretrained(..., encoders_kwargs={{{key!r}: {{'projector': MultimodalProjector(config, projection=...)}}}})."
            )
        kwargs["projector"] = MultimodalProjector(projector_config)
    return kwargs



class SaveLoad:
    """``config``, ``save_pretrained`` and ``from_pretrained`` of :class:`MultimodalModel` (a mixin)."""

    @property
    def config(self) -> MultimodalModelConfig:
        """The composite's config: every part's class and config, projectors, callbacks and token ids."""
        encoders = {}
        for key, encoder in self.encoders.items():
            projector = encoder.projector
            encoders[key] = {
                **_part_spec(encoder.module),
                "projector": projector.config.to_dict(),
                "custom_projection": import_path(type(projector.projection)) if projector.is_custom else None,
                "callbacks": {
                    name: callback_spec(fn) for name in CALLBACK_NAMES if (fn := getattr(encoder, name)) is not None
                },
                "feature_layer": encoder.feature_layer,
            }
        return MultimodalModelConfig(
            encoders=encoders,
            encoder_order=list(self._encoder_keys),
            language_model=_part_spec(self.language_model),
            modality_token_ids=dict(self.modality_token_ids),
        )

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``config.json``, ``model.safetensors`` (and the LM's ``generation_config.json``) to a directory."""
        os.makedirs(save_directory, exist_ok=True)
        self.config.save_pretrained(save_directory)
        save_model(self, os.path.join(save_directory, WEIGHTS_NAME), metadata={"format": "pt"})
        generation_config = getattr(self.language_model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(save_directory)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_path: str | os.PathLike,
        encoders_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
        device: str | torch.device | None = None,
    ) -> "MultimodalModel":
        """Load a model written by :meth:`save_pretrained`, bit-exactly.

        Args:
            pretrained_model_path: the directory.
            encoders_kwargs: per modality, ``ModalEncoderModule`` arguments to use instead of the saved ones:
                callbacks that are not importable module-level functions, or a ``projector`` with a custom
                projection module.
            device: where to put the model.

        Raises:
            ValueError: if a saved callback or custom projection cannot be rebuilt and was not given.
        """
        config = MultimodalModelConfig.from_pretrained(pretrained_model_path)
        encoders_kwargs = {k: dict(v) for k, v in (encoders_kwargs or {}).items()}
        with no_init_weights():
            order = config.encoder_order or list(config.encoders)  # config JSON sorts keys; the order matters
            encoders = {
                key: ModalEncoderModule(
                    _build_part(config.encoders[key], f"{key} encoder"),
                    **_encoder_kwargs(key, config.encoders[key], encoders_kwargs.get(key, {})),
                )
                for key in order
            }
            model = cls(encoders, _build_part(config.language_model, "language model"))
        model.set_modality_token_ids(config.modality_token_ids)
        load_model(model, os.path.join(pretrained_model_path, WEIGHTS_NAME), strict=True)
        if os.path.exists(os.path.join(pretrained_model_path, "generation_config.json")):
            model.language_model.generation_config = GenerationConfig.from_pretrained(pretrained_model_path)
        return model.to(device) if device is not None else model

