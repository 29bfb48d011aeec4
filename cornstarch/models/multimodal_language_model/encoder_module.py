"""``ModalEncoderModule``: one modality's Hugging Face encoder, its callbacks and its projector."""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn
from transformers.utils import ModelOutput

from ..dynamic_resolution import family_callbacks
from ..encoder_layers import LayerOutput, truncate_after
from .configuration_multimodal_language_model import MultimodalProjectorConfig
from .projector import MultimodalProjector

CALLBACK_NAMES = ("preprocess_callback", "postprocess_module_callback", "postprocess_projector_callback")

# Arguments of MultimodalModel.forward that belong to the language model and are never routed to an encoder.
LM_ARGUMENTS = frozenset(
    {"input_ids", "attention_mask", "labels", "position_ids", "inputs_embeds", "cache", "past_key_values",
     "use_cache", "cache_position", "logits_to_keep", "token_type_ids"}
)


def hidden_size_of(config: Any) -> int:
    """The feature width a Hugging Face config declares: ``out_hidden_size`` (the output of a tower whose last
    module changes the width, as Qwen2.5-VL's patch merger), else ``hidden_size``, ``d_model`` or ``n_embd``, else
    the last stage's width ``hidden_sizes[-1]`` (convolutional backbones).

    Raises:
        ValueError: if the config has none of them.

    >>> from transformers import WhisperConfig
    >>> hidden_size_of(WhisperConfig(d_model=48))
    48
    """
    for name in ("out_hidden_size", "hidden_size", "d_model", "n_embd"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    stages = getattr(config, "hidden_sizes", None)
    if isinstance(stages, (list, tuple)) and stages and isinstance(stages[-1], int):
        return stages[-1]
    raise ValueError(f"Cannot tell the hidden size of {type(config).__name__}: it has no hidden_size/d_model/n_embd/"
                     "hidden_sizes.")


# model_type → why that family's model cannot be a modality encoder (what only shows when it runs; found by the
# test suite's sweep over transformers' vision and audio classes).
UNSUPPORTED_ENCODERS: dict[str, str] = {
    "imagegpt": "it reads images as colour-cluster token ids (input_ids), an argument MultimodalModel keeps for the "
                "language model",
}


def unsupported_encoder_reason(model: nn.Module) -> str | None:
    """Why ``model`` cannot be a modality encoder, or None if it can (or is not a Hugging Face model).

    >>> from transformers import WhisperConfig, WhisperModel
    >>> whisper = WhisperModel(WhisperConfig(d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
    ...                                      decoder_attention_heads=2, encoder_ffn_dim=8, decoder_ffn_dim=8))
    >>> unsupported_encoder_reason(whisper)
    'it is an encoder-decoder model: give its encoder, model.get_encoder()'
    >>> unsupported_encoder_reason(whisper.get_encoder()) is None
    True
    """
    config = getattr(model, "config", None)
    if config is None:
        return None
    get_encoder = getattr(model, "get_encoder", None)
    if getattr(config, "is_encoder_decoder", False) and callable(get_encoder) and get_encoder() is not model:
        return "it is an encoder-decoder model: give its encoder, model.get_encoder()"
    return UNSUPPORTED_ENCODERS.get(getattr(config, "model_type", None))


def _first(output: Any) -> Any:
    """Element 0 of an encoder output (a ``ModelOutput``, tuple or list), or the output itself if a tensor."""
    return output if isinstance(output, torch.Tensor) else output[0]


def _as_tokens(output: Any) -> Any:
    """``output`` with a convolutional feature map ``[n_items, channels, height, width]`` as element 0 turned into
    tokens ``[n_items, height * width, channels]`` (row-major); other outputs as they are."""
    first = _first(output)
    if isinstance(first, torch.Tensor) and first.dim() == 4:
        return _replace_first(output, first.flatten(2).transpose(1, 2))
    return output


def _replace_first(output: Any, value: Any) -> Any:
    """A copy of ``output`` whose element 0 is ``value``, keeping its type."""
    if isinstance(output, torch.Tensor):
        return value
    if isinstance(output, ModelOutput):
        first_key = next(iter(output.keys()))
        return type(output)(**{**output, first_key: value})
    return type(output)((value, *output[1:])) if isinstance(output, tuple) else [value, *output[1:]]


def _flatten_features(features: Any) -> torch.Tensor:
    """``[n_items, n_tokens, hidden]`` (or a list of ``[n_tokens_i, hidden]``) → ``[n_features, hidden]``."""
    if isinstance(features, (list, tuple)):
        return torch.cat([f.reshape(-1, f.shape[-1]) for f in features], dim=0)
    return features.reshape(-1, features.shape[-1])


class ModalEncoderModule(nn.Module):
    """One modality: a Hugging Face encoder, its projector and optional callbacks.

    Order: ``preprocess_callback(inputs) -> inputs`` → ``module(**inputs)`` →
    ``postprocess_module_callback(inputs, output) -> output`` → ``projector(output[0])`` →
    ``postprocess_projector_callback(inputs, output) -> output``. The features merged into the LLM are element 0
    of the last output, flattened to ``[n_features, llm_hidden]``. A convolutional backbone's feature map
    ``[n_items, channels, height, width]`` (ConvNeXt, ResNet, …) reaches the callbacks as tokens
    ``[n_items, height * width, channels]``.

    Every key the preprocess callback returns that the encoder's ``forward`` names, or that the callback added,
    reaches the encoder as a keyword argument; other keys (e.g. ``image_sizes`` for a callback) stay visible to
    the callbacks only. An encoder whose parameters are all frozen runs without building an autograd graph.

    Variable-resolution towers (Qwen2-VL, Qwen2.5-VL, SigLIP2 NaFlex) given no callbacks get their family's
    (:func:`cornstarch.models.dynamic_resolution.family_callbacks`), so they take their image processor's outputs
    as they are and yield one feature per merged or valid patch.

    A callback may be an object with settings (:class:`cornstarch.models.callbacks.ConfiguredCallback`): its
    ``input_names`` are routed to this encoder too, its ``encoder_kwargs`` join the encoder call, and
    ``attach(module)`` is called with the encoder. A callback that is an ``nn.Module`` (one with learned
    parameters, such as Llava-Next's ``image_newline``) is a submodule: its parameters train, save and load with
    the projector.

    Args:
        model: the encoder (``module=`` is accepted as an alias, as in the reference page).
        projector: a :class:`MultimodalProjector` (a plain ``nn.Module`` is wrapped in one); ``None`` lets
            :class:`MultimodalModel` create one sized encoder hidden → LLM hidden.
        preprocess_callback, postprocess_module_callback, postprocess_projector_callback: see above.
        feature_layer: take the features from this layer (an index into the encoder's layer list: ``-2`` is
            Llava's default) instead of the encoder's final output. The layers after it are removed from the
            encoder (never computed, never saved); its raw output, before any final norm or pooling head, becomes
            element 0 of the encoder output the callbacks see. ``None``: the encoder's output as is.

    Raises:
        ValueError: if no encoder module is given, ``model`` and ``module`` disagree, the model cannot be an encoder
            (an encoder-decoder, or a family in ``UNSUPPORTED_ENCODERS``: the message names its class and the
            reason), or ``feature_layer`` does not fit the encoder.

    Llava's default selection (layer -2, CLS dropped), computing only the layers it needs:

    >>> import transformers as tf
    >>> from cornstarch.models.feature_selection import without_cls
    >>> clip = tf.CLIPVisionModel(tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
    ...                                               num_attention_heads=4, image_size=32, patch_size=8))
    >>> encoder = ModalEncoderModule(clip, feature_layer=-2, postprocess_module_callback=without_cls)
    >>> encoder.module.config.num_hidden_layers, encoder.hidden_size
    (2, 32)
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        projector: nn.Module | None = None,
        preprocess_callback: Callable[[dict], dict] | None = None,
        postprocess_module_callback: Callable[[dict, Any], Any] | None = None,
        postprocess_projector_callback: Callable[..., Any] | None = None,
        feature_layer: int | None = None,
        *,
        module: nn.Module | None = None,
    ):
        super().__init__()
        if model is not None and module is not None and model is not module:
            raise ValueError("ModalEncoderModule got both model= and module= (aliases); pass one.")
        model = model if model is not None else module
        if not isinstance(model, nn.Module):
            raise ValueError(f"ModalEncoderModule needs an encoder nn.Module as model= (or module=), got {model!r}.")
        reason = unsupported_encoder_reason(model)
        if reason is not None:
            raise ValueError(f"{type(model).__name__} cannot be a modality encoder: {reason}.")
        if projector is not None and not isinstance(projector, MultimodalProjector):
            if not isinstance(projector, nn.Module):
                raise ValueError(f"projector must be a MultimodalProjector or nn.Module, got {type(projector).__name__}.")
            projector = MultimodalProjector(MultimodalProjectorConfig(), projection=projector)
        if not (preprocess_callback or postprocess_module_callback or postprocess_projector_callback):
            defaults = family_callbacks(model)  # variable-resolution towers: fed their processor's outputs
            preprocess_callback = defaults.get("preprocess_callback")
            postprocess_module_callback = defaults.get("postprocess_module_callback")
        self.module = model
        self.projector = projector
        self._hidden_size: int | None = None
        self.preprocess_callback = preprocess_callback
        self.postprocess_module_callback = postprocess_module_callback
        self.postprocess_projector_callback = postprocess_projector_callback
        # After truncation the selected layer is the encoder's last one: -1 from then on (and when saved).
        self.feature_layer = None if feature_layer is None else -1
        self._layers_path = None if feature_layer is None else truncate_after(model, feature_layer)
        params = inspect.signature(model.forward).parameters.values()
        self._module_arguments = frozenset(
            p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        )
        for callback in self.callbacks():
            if hasattr(callback, "attach"):
                callback.attach(model)

    def callbacks(self) -> list[Callable]:
        """The callbacks that are set, in call order."""
        return [cb for name in CALLBACK_NAMES if (cb := getattr(self, name)) is not None]

    def callback_modules(self) -> dict[str, nn.Module]:
        """Callbacks that are ``nn.Module`` s (they hold parameters), by attribute name."""
        return {name: cb for name in CALLBACK_NAMES if isinstance(cb := getattr(self, name), nn.Module)}

    @property
    def input_names(self) -> frozenset[str]:
        """Names of the batch entries routed to this encoder by :class:`MultimodalModel`: its ``forward``'s and
        the ``input_names`` its callbacks declare (only those when the preprocess callback ``replaces_inputs``: it
        builds every argument of the encoder from them, as a video's frames become an image tower's ``pixel_values``)."""
        declared = frozenset().union(*(getattr(cb, "input_names", ()) for cb in self.callbacks()))
        own = frozenset() if getattr(self.preprocess_callback, "replaces_inputs", False) else self._module_arguments
        return (own | declared) - LM_ARGUMENTS

    @property
    def hidden_size(self) -> int:
        """The encoder module's output width (before callbacks): from its config for the families with built-in
        feature counts, otherwise measured once by running it on a placeholder item (:func:`cornstarch.models.dummy_inputs.dummy_inputs`),
        since a backbone's config may name its inner width rather than that of its features (SAM's neck, a
        CNN's last stage); from the config when no placeholder item can be built.

        Raises:
            ValueError: naming the encoder's class, when neither its config nor a run tells its width.
        """
        if self._hidden_size is None:
            self._hidden_size = self._measured_width()
        return self._hidden_size

    def _measured_width(self) -> int:
        from ..dummy_inputs import dummy_inputs
        from ..feature_counts import BUILTIN_COUNTS

        config = getattr(self.module, "config", None)
        try:
            declared = hidden_size_of(config)
        except ValueError:
            declared = None
        if declared is not None and getattr(config, "model_type", None) in BUILTIN_COUNTS:
            return declared
        try:
            item = dummy_inputs(self)
        except ValueError:
            item = None
        if item is None:
            if declared is None:
                raise ValueError(f"{type(self.module).__name__} cannot be a modality encoder here: its config "
                                 f"({type(config).__name__}) declares no feature width (hidden_size, d_model, n_embd "
                                 "or hidden_sizes) and no placeholder item can be built to measure it; give its "
                                 "vision or audio sub-model, or a projector sized for its features.")
            return declared
        modes = [(m, m.training) for m in self.module.modules()]
        self.module.eval()
        try:
            with torch.no_grad():
                output = self.module(**item)
        except Exception:  # the placeholder does not suit this encoder (it wants other inputs): trust the config
            if declared is None:
                raise
            return declared
        finally:
            for module, mode in modes:
                module.training = mode
        return int(_first(_as_tokens(output)).shape[-1])  # before callbacks (one that widens needs its projector)

    def _needs_grad(self, kwargs: dict[str, Any]) -> bool:
        if not torch.is_grad_enabled():
            return False
        if any(p.requires_grad for p in self.module.parameters()):
            return True
        return any(isinstance(v, torch.Tensor) and v.requires_grad for v in kwargs.values())

    def forward(self, **inputs: Any) -> torch.Tensor:
        """Encode, project and post-process one modality's batch.

        Returns:
            ``[n_features, out_features]``: all items' features, item after item.
        """
        if self.projector is None:
            raise ValueError(
                "This ModalEncoderModule has no projector yet: give one, or put it in a MultimodalModel, which "
                "creates it."
            )
        raw_keys = inputs.keys()
        if self.preprocess_callback is not None:
            inputs = self.preprocess_callback(inputs)
        passed = {k: v for k, v in inputs.items() if k in self._module_arguments or k not in raw_keys}
        for callback in self.callbacks():
            passed = {**getattr(callback, "encoder_kwargs", {}), **passed}
        with torch.set_grad_enabled(self._needs_grad(passed)):
            if self._layers_path is None:
                output = self.module(**passed)  # element 0: [n_items, n_tokens, hidden]
            else:
                with LayerOutput(self.module.get_submodule(self._layers_path)[-1]) as selected:
                    output = self.module(**passed)
                output = _replace_first(output, selected.value)  # the selected layer's raw output
        output = _as_tokens(output)  # a backbone's feature map [items, channels, h, w] → [items, h * w, channels]
        if self.postprocess_module_callback is not None:
            output = self.postprocess_module_callback(inputs, output)
        output = _replace_first(output, self.projector(_first(output)))
        if self.postprocess_projector_callback is not None:
            output = self.postprocess_projector_callback(inputs, output)
        return _flatten_features(_first(output))  # [n_features, out_features]

