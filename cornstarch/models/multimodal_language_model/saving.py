"""Saving and loading a composite model: one directory with ``config.json`` and ``model.safetensors``.

``config.json`` names each part's class and config, the projectors, importable callbacks and token ids
(:class:`MultimodalModelConfig`); the weights are one safetensors file. Parts are rebuilt from their configs without
initialising weights, then loaded strictly.
"""

from __future__ import annotations

import hashlib
import inspect
import json
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


def _keys_when_built(cls: type, config: Any, kwargs: dict[str, Any]) -> set[str] | None:
    """The state-dict keys ``cls(config, **kwargs)`` has (built on the meta device), or None if it cannot be built."""
    try:
        with torch.device("meta"), no_init_weights():
            return set(cls(config, **kwargs).state_dict())
    except Exception:  # noqa: BLE001 - any failure means "not this way"
        return None


def _init_kwargs(module: nn.Module) -> dict[str, Any]:
    """The constructor arguments beyond its config that rebuild ``module`` with the same parameters: ``{}`` when the
    config alone does, else the boolean keyword arguments (e.g. ``add_pooling_layer=False``) that match.

    Raises:
        ValueError: if no such arguments are found (the saved directory would not load).
    """
    cls, config, keys = type(module), module.config, set(module.state_dict())
    if _keys_when_built(cls, config, {}) in (keys, None):
        return {}
    flags = [name for name, p in inspect.signature(cls.__init__).parameters.items()
             if isinstance(p.default, bool) and name != "self"]
    for name in flags:
        kwargs = {name: not inspect.signature(cls.__init__).parameters[name].default}
        if _keys_when_built(cls, config, kwargs) == keys:
            return kwargs
    raise ValueError(
        f"{cls.__name__} has parameters that {cls.__name__}(config) does not rebuild (it was built with constructor "
        f"arguments its config does not record, or modified afterwards), so a saved copy could not be loaded. Build "
        f"it from its config alone, or save it with its own save_pretrained.")


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
    module = resolve(spec["model_class"])(config, **spec.get("init_kwargs", {}))
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


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 hex digest of a file, read in 16 MiB blocks.

    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "x")
    >>> _ = open(path, "wb").write(b"abc")
    >>> file_sha256(path)[:16]
    'ba7816bf8f01cfea'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def _read_config(path: str | os.PathLike) -> MultimodalModelConfig:
    """The directory's :class:`MultimodalModelConfig`, with errors that name the directory and what is wrong."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is not a directory: MultimodalModel.from_pretrained loads a directory "
                                f"written by save_pretrained or `cornstarch export` (hub ids are not supported).")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{config_file!r} does not exist: {path!r} is not a saved MultimodalModel directory.")
    with open(config_file) as f:
        raw = json.load(f)
    if raw.get("model_type") != MultimodalModelConfig.model_type or "model_class" not in raw.get("language_model", {}):
        raise ValueError(f"{config_file!r} is not a MultimodalModel config (model_type {raw.get('model_type')!r}, "
                         f"no language_model.model_class); a Hugging Face format export loads with transformers.")
    return MultimodalModelConfig.from_pretrained(path)


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
        """Write ``model.safetensors``, ``config.json`` (with the weights' SHA-256, checked by ``from_pretrained``)
        and the LM's ``generation_config.json`` to a directory.

        Raises:
            ValueError: if a part has parameters its class and config alone cannot rebuild (the directory would not
                load), e.g. one built with a constructor argument its config does not record that is not a boolean
                flag.
        """
        config = self.config
        for key, encoder in self.encoders.items():  # fails before anything is written if a part cannot be rebuilt
            config.encoders[key]["init_kwargs"] = _init_kwargs(encoder.module)
        config.language_model["init_kwargs"] = _init_kwargs(self.language_model)
        os.makedirs(save_directory, exist_ok=True)
        weights = os.path.join(save_directory, WEIGHTS_NAME)
        save_model(self, weights, metadata={"format": "pt"})
        config.weights_sha256 = file_sha256(weights)
        config.save_pretrained(save_directory)
        generation_config = getattr(self.language_model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(save_directory)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_path: str | os.PathLike,
        encoders_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
        device: str | torch.device | None = None,
        verify_weights: bool = True,
    ) -> "MultimodalModel":
        """Load a model written by :meth:`save_pretrained`, bit-exactly.

        Args:
            pretrained_model_path: the directory.
            encoders_kwargs: per modality, ``ModalEncoderModule`` arguments to use instead of the saved ones:
                callbacks that are not importable module-level functions, or a ``projector`` with a custom
                projection module.
            device: where to put the model.
            verify_weights: check ``model.safetensors`` against the SHA-256 that ``config.json`` records (one read of
                the file; ``False`` skips it, e.g. after editing the weights on purpose).

        Raises:
            FileNotFoundError: if the directory or its ``config.json`` or weights do not exist.
            ValueError: if ``config.json`` is not a MultimodalModel config, if the weights do not match their
                recorded checksum (a corrupt or altered file), or if a saved callback or custom projection cannot be
                rebuilt and was not given.
        """
        config = _read_config(pretrained_model_path)
        weights = os.path.join(pretrained_model_path, WEIGHTS_NAME)
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"{weights!r} does not exist: the directory holds a config but no weights.")
        expected = getattr(config, "weights_sha256", None)
        if verify_weights and expected and file_sha256(weights) != expected:
            raise ValueError(f"{weights!r} does not match the SHA-256 recorded in config.json: the file is corrupt or "
                             f"was changed after saving. Re-export it, or pass verify_weights=False to load it anyway.")
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
        load_model(model, weights, strict=True)
        if os.path.exists(os.path.join(pretrained_model_path, "generation_config.json")):
            model.language_model.generation_config = GenerationConfig.from_pretrained(pretrained_model_path)
        return model.to(device) if device is not None else model

