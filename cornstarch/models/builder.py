"""Build a MultimodalModel and its MultimodalProcessor from plain specs (what a YAML config holds).

A part is a Hugging Face class plus either a checkpoint (local path or hub id) or an inline config, so the same
spec serves a tiny CPU experiment and a GPU recipe with real checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoTokenizer

from .multimodal_language_model import ModalEncoderModule, MultimodalModel, MultimodalProcessor
from .multimodal_language_model.import_paths import resolve


def _class(path: str) -> Any:
    """A class from ``"transformers.CLIPVisionModel"`` or ``"package.module:Name"``."""
    if ":" not in path:
        module, _, name = path.rpartition(".")
        path = f"{module}:{name}"
    try:
        return resolve(path)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"Cannot import {path!r}: {err}") from err


def local_or_hub(path: str, what: str) -> str:
    """``path`` with ``~`` expanded, after checking that a local path (one starting with ``/``, ``.`` or ``~``, or
    with more than one ``/``: hub ids are ``name`` or ``org/name``) exists.

    Args:
        path: a local directory or a hub id.
        what: what the path is for, named in the error.

    Raises:
        FileNotFoundError: naming ``what`` and ``path``, for a local path that does not exist.

    >>> local_or_hub("org/model", "tokenizer")
    'org/model'
    >>> local_or_hub("./no/such/dir", "tokenizer")
    Traceback (most recent call last):
        ...
    FileNotFoundError: tokenizer: path './no/such/dir' does not exist (a local path; hub ids are 'name' or 'org/name').
    """
    expanded = os.path.expanduser(path)
    looks_local = path.startswith(("/", ".", "~")) or path.count("/") > 1
    if looks_local and not os.path.exists(expanded):
        raise FileNotFoundError(f"{what}: path {path!r} does not exist (a local path; hub ids are 'name' or "
                                "'org/name').")
    return expanded


@dataclass
class PartSpec:
    """One Hugging Face model: ``class_path`` plus a checkpoint or an inline config.

    Args:
        class_path: e.g. ``"transformers.LlamaForCausalLM"``.
        pretrained: a local directory or hub id for ``from_pretrained``.
        config: config keyword arguments; with ``pretrained`` they override the checkpoint's, without it the
            model is built from scratch (the config class is the model class's ``config_class``).
        dtype: ``"float32"``, ``"bfloat16"``, … (default: the checkpoint's or float32).
        kwargs: extra ``from_pretrained`` keyword arguments (e.g. ``attn_implementation``).
    """

    class_path: str
    pretrained: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> torch.nn.Module:
        """Instantiate the model (offline when ``pretrained`` is a local path)."""
        cls = _class(self.class_path)
        dtype = getattr(torch, self.dtype) if self.dtype else None
        if self.pretrained:
            path = local_or_hub(self.pretrained, f"{self.class_path} pretrained")
            extra = {"dtype": dtype} if dtype is not None else {}
            return cls.from_pretrained(path, **self.config, **extra, **self.kwargs)
        if not self.config:
            raise ValueError(f"{self.class_path}: give pretrained=<path or hub id> or an inline config.")
        model = cls(cls.config_class(**self.config), **self.kwargs)
        return model.to(dtype) if dtype is not None else model


@dataclass
class ProcessorSpec:
    """An encoder's processor: ``class_path`` plus a checkpoint and/or keyword arguments.

    >>> ProcessorSpec("transformers.CLIPImageProcessor", kwargs={"crop_size": {"height": 32, "width": 32}}).class_path
    'transformers.CLIPImageProcessor'
    """

    class_path: str
    pretrained: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> Any:
        """Instantiate the processor.

        Raises:
            FileNotFoundError: for a local ``pretrained`` path that does not exist.
        """
        cls = _class(self.class_path)
        if not self.pretrained:
            return cls(**self.kwargs)
        return cls.from_pretrained(local_or_hub(self.pretrained, f"{self.class_path} pretrained"), **self.kwargs)


@dataclass
class EncoderSpec:
    """One modality: encoder, processor, placeholder text and optional callbacks (``"module:function"``).

    Args:
        model: the encoder.
        processor: its processor.
        token: placeholder text in prompts (default ``<{key}>``).
        preprocess_callback, postprocess_module_callback, postprocess_projector_callback: import paths.
        feature_layer: features from this encoder layer (-2: Llava's default); later layers are dropped.
    """

    model: PartSpec
    processor: ProcessorSpec
    token: str | None = None
    preprocess_callback: str | None = None
    postprocess_module_callback: str | None = None
    postprocess_projector_callback: str | None = None
    feature_layer: int | None = None

    def module_kwargs(self) -> dict[str, Any]:
        """``ModalEncoderModule`` keyword arguments: the resolved callbacks and ``feature_layer``."""
        names = ("preprocess_callback", "postprocess_module_callback", "postprocess_projector_callback")
        return {**{n: resolve(getattr(self, n)) for n in names if getattr(self, n)},
                "feature_layer": self.feature_layer}


@dataclass
class HfSpec:
    """A pretrained transformers multimodal model to start from: Llava, Llava-Next or Qwen2-Audio, with its
    processor (:meth:`MultimodalModel.from_hf`, :meth:`MultimodalProcessor.from_hf`).

    Args:
        source: a local directory or hub id holding the native model and its processor.
        dtype: ``"bfloat16"``, ``"float32"``, … (default: the checkpoint's).
        drop_unused_layers: remove the vision layers after ``vision_feature_layer`` (never computed).
        kwargs: extra ``from_pretrained`` keyword arguments (e.g. ``attn_implementation``).

    >>> HfSpec("llava-hf/llava-1.5-7b-hf", dtype="bfloat16").source
    'llava-hf/llava-1.5-7b-hf'
    """

    source: str
    dtype: str | None = None
    drop_unused_layers: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> tuple[MultimodalModel, MultimodalProcessor]:
        """The model and a processor wired to it (offline when ``source`` is a local directory).

        Raises:
            FileNotFoundError: for a local path that does not exist.
            ValueError: for a checkpoint of another family.
        """
        source = local_or_hub(self.source, "from_hf")
        extra = {"dtype": getattr(torch, self.dtype)} if self.dtype else {}
        model = MultimodalModel.from_hf(source, drop_unused_layers=self.drop_unused_layers, **extra, **self.kwargs)
        return model, MultimodalProcessor.from_hf(source, model=model)


def build_tokenizer(path: str) -> Any:
    """A tokenizer from a directory/hub id, or from a ``"module:function"`` that returns one (e.g. the demo's).

    Raises:
        FileNotFoundError: for a local directory that does not exist (see :func:`local_or_hub`).
    """
    if ":" in path and not path.startswith(("/", ".", "~")) and "://" not in path:
        return resolve(path)()
    return AutoTokenizer.from_pretrained(local_or_hub(path, "tokenizer"))


def build_model_and_processor(
    encoders: dict[str, EncoderSpec],
    language_model: PartSpec,
    tokenizer: str,
    projector_type: str = "linear",
    projector_activation: str = "gelu",
) -> tuple[MultimodalModel, MultimodalProcessor]:
    """Build the model and a processor wired to it (token ids set, feature counts from the encoders).

    Raises:
        ValueError: for an unimportable class, a part with neither checkpoint nor config, or a tokenizer whose
            regular tokens do not fit the LM's vocabulary.
    """
    tok = build_tokenizer(tokenizer)
    lm = language_model.build()
    modules = {key: ModalEncoderModule(spec.model.build(), **spec.module_kwargs()) for key, spec in encoders.items()}
    model = MultimodalModel(modules, lm, init_projector_type=projector_type, init_activation=projector_activation)
    processor = MultimodalProcessor(
        {key: spec.processor.build() for key, spec in encoders.items()}, tok, model=model,
        predefined_tokens={key: spec.token for key, spec in encoders.items() if spec.token},
    )
    vocab = lm.get_input_embeddings().num_embeddings
    regular = [i for i in tok.get_vocab().values() if i not in processor.token_ids.values()]
    if max(regular) >= vocab:
        raise ValueError(f"The tokenizer has token ids up to {max(regular)} but the language model's vocabulary "
                         f"has {vocab} entries; set the LM's vocab_size to at least {max(regular) + 1}.")
    return model, processor
