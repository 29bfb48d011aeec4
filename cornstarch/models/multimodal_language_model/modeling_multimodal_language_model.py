"""The multimodal model: Hugging Face encoders, each with a projector, feeding a causal LM.

``MultimodalProjector`` maps encoder features to the LLM's embedding width, ``ModalEncoderModule`` runs one
encoder with its callbacks and projector, and ``MultimodalModel`` merges every modality's features into the
LLM's input embeddings at the modality-token positions.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import GenerationConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.initialization import no_init_weights
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from ..dummy_inputs import dummy_inputs
from ..encoder_layers import LayerOutput, truncate_after
from .configuration_multimodal_language_model import (
    MultimodalModelConfig,
    MultimodalProjectorConfig,
    validate_projection,
)
from .import_paths import UNSERIALIZABLE, import_path, resolve
from .merging import merge_embeddings, modality_masks
from .chunked_loss import check_chunk_size, chunked_head_loss, fusable_head
from .supervised_loss import HiddenStatesAt, at_positions, causal_lm_loss, next_token_targets
from .supervised_loss import supervised_positions as supervised_positions_of

WEIGHTS_NAME = "model.safetensors"
try:  # keyword arguments every transformers model forward accepts through **kwargs
    from transformers.utils.generic import TransformersKwargs

    _TRANSFORMERS_KWARGS = frozenset(TransformersKwargs.__required_keys__ | TransformersKwargs.__optional_keys__)
except ImportError:  # pragma: no cover
    _TRANSFORMERS_KWARGS = frozenset({"output_attentions", "output_hidden_states"})
CALLBACK_NAMES = ("preprocess_callback", "postprocess_module_callback", "postprocess_projector_callback")
# Arguments of MultimodalModel.forward that belong to the language model and are never routed to an encoder.
LM_ARGUMENTS = frozenset(
    {"input_ids", "attention_mask", "labels", "position_ids", "inputs_embeds", "cache", "past_key_values",
     "use_cache", "cache_position", "logits_to_keep", "token_type_ids"}
)


def hidden_size_of(config: Any) -> int:
    """The feature width a Hugging Face config declares: ``hidden_size``, else ``d_model``, else ``n_embd``.

    Raises:
        ValueError: if the config has none of them.

    >>> from transformers import WhisperConfig
    >>> hidden_size_of(WhisperConfig(d_model=48))
    48
    """
    for name in ("hidden_size", "d_model", "n_embd"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"Cannot tell the hidden size of {type(config).__name__}: it has no hidden_size/d_model/n_embd.")


def _first(output: Any) -> Any:
    """Element 0 of an encoder output (a ``ModelOutput``, tuple or list), or the output itself if a tensor."""
    return output if isinstance(output, torch.Tensor) else output[0]


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


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _is_frozen(module: nn.Module) -> bool:
    """True if ``module`` has parameters and none of them requires a gradient."""
    return _has_params(module) and not any(p.requires_grad for p in module.parameters())


def _dtype_name(module: nn.Module) -> str | None:
    param = next((p for p in module.parameters() if p.is_floating_point()), None)
    return None if param is None else str(param.dtype).removeprefix("torch.")


class MultimodalProjector(PreTrainedModel):
    """Maps encoder features ``[..., in_features]`` to the LLM's embedding width ``[..., out_features]``.

    Args:
        config: ``projection_type="linear"`` builds one ``nn.Linear``; ``"mlp"`` Linear → activation → Linear.
        projection: a module used as is instead of building one (its weights are kept).

    Raises:
        ValueError: if no ``projection`` is given and the config lacks ``in_features``/``out_features``.

    >>> cfg = MultimodalProjectorConfig(in_features=8, out_features=16, projection_type="mlp")
    >>> MultimodalProjector(cfg)(torch.zeros(2, 3, 8)).shape
    torch.Size([2, 3, 16])
    """

    config_class = MultimodalProjectorConfig
    base_model_prefix = "projector"
    main_input_name = "hidden_states"
    supports_gradient_checkpointing = False

    def __init__(self, config: MultimodalProjectorConfig, projection: nn.Module | None = None):
        super().__init__(config)
        if projection is None:
            self.projection = self._build(config)
        else:
            self.projection = nn.Identity()
        self.post_init()
        if projection is not None:  # set after post_init so the user's weights are not re-initialised
            self.projection = projection

    @staticmethod
    def _build(config: MultimodalProjectorConfig) -> nn.Module:
        if not isinstance(config.in_features, int) or not isinstance(config.out_features, int):
            raise ValueError(
                "MultimodalProjectorConfig needs integer in_features and out_features to build a projection "
                f"(got in_features={config.in_features!r}, out_features={config.out_features!r}); or pass "
                "projection=<your nn.Module>."
            )
        if config.projection_type == "linear":
            return nn.Linear(config.in_features, config.out_features)
        return nn.Sequential(
            nn.Linear(config.in_features, config.out_features),
            ACT2FN[config.activation],
            nn.Linear(config.out_features, config.out_features),
        )

    @property
    def is_custom(self) -> bool:
        """Whether the projection is a user module rather than one built from the config."""
        return not (isinstance(self.projection, nn.Linear) or isinstance(self.projection, nn.Sequential)
                    and len(self.projection) == 3 and all(isinstance(self.projection[i], nn.Linear) for i in (0, 2)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.projection(hidden_states)  # [..., out_features]


class ModalEncoderModule(nn.Module):
    """One modality: a Hugging Face encoder, its projector and optional callbacks.

    Order: ``preprocess_callback(inputs) -> inputs`` → ``module(**inputs)`` →
    ``postprocess_module_callback(inputs, output) -> output`` → ``projector(output[0])`` →
    ``postprocess_projector_callback(inputs, output) -> output``. The features merged into the LLM are element 0
    of the last output, flattened to ``[n_features, llm_hidden]``.

    Every key the preprocess callback returns that the encoder's ``forward`` names, or that the callback added,
    reaches the encoder as a keyword argument; other keys (e.g. ``image_sizes`` for a callback) stay visible to
    the callbacks only. An encoder whose parameters are all frozen runs without building an autograd graph.

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
        ValueError: if no encoder module is given, ``model`` and ``module`` disagree, or ``feature_layer`` does
            not fit the encoder.

    >>> # Llava's default selection (layer -2, CLS dropped), computing only the layers it needs:
    >>> # ModalEncoderModule(clip, feature_layer=-2, postprocess_module_callback=without_cls)
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
        if projector is not None and not isinstance(projector, MultimodalProjector):
            if not isinstance(projector, nn.Module):
                raise ValueError(f"projector must be a MultimodalProjector or nn.Module, got {type(projector).__name__}.")
            projector = MultimodalProjector(MultimodalProjectorConfig(), projection=projector)
        self.module = model
        self.projector = projector
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

    @property
    def input_names(self) -> frozenset[str]:
        """Names of the batch entries routed to this encoder by :class:`MultimodalModel` (its ``forward``'s)."""
        return self._module_arguments - LM_ARGUMENTS

    @property
    def hidden_size(self) -> int:
        """The encoder's output width, from its config."""
        return hidden_size_of(self.module.config)

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
        with torch.set_grad_enabled(self._needs_grad(passed)):
            if self._layers_path is None:
                output = self.module(**passed)  # element 0: [n_items, n_tokens, hidden]
            else:
                with LayerOutput(self.module.get_submodule(self._layers_path)[-1]) as selected:
                    output = self.module(**passed)
                output = _replace_first(output, selected.value)  # the selected layer's raw output
        if self.postprocess_module_callback is not None:
            output = self.postprocess_module_callback(inputs, output)
        output = _replace_first(output, self.projector(_first(output)))
        if self.postprocess_projector_callback is not None:
            output = self.postprocess_projector_callback(inputs, output)
        return _flatten_features(_first(output))  # [n_features, out_features]


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


@dataclass
class MultimodalCausalLMOutput(CausalLMOutputWithPast):
    """A causal-LM output whose ``logits`` may cover only some positions.

    ``logits_positions``: ``[n]`` flat positions (``row * seq + column``) when ``logits`` is ``[1, n, vocab]``
    (training with labels: only where the next token is supervised); None when ``logits`` covers every position.
    ``predictions``: ``[1, n]`` the argmax of each of those logits, given instead of ``logits`` (None) when the head
    and loss ran in chunks (``MultimodalModel.loss_chunk_size``).
    """

    logits_positions: torch.LongTensor | None = None
    predictions: torch.LongTensor | None = None


class MultimodalModel(nn.Module):
    """A causal LM fed by any number of modality encoders.

    Args:
        encoders: modality key (``"vision"``, ``"audio"``, …) → :class:`ModalEncoderModule`. Each is also the
            attribute ``{key}_encoder``.
        language_model: a Hugging Face causal LM (``…ForCausalLM``).
        init_projector_type: ``"linear"`` or ``"mlp"``, for encoders given without a projector.
        init_activation: a key of ``transformers.activations.ACT2CLS``, for ``"mlp"``.

    Raises:
        ValueError: for an encoder that is not a ``ModalEncoderModule``, a bad key, an unknown projector type or
            activation, or a given projector whose sizes do not fit the encoder and the LLM.

    >>> # mllm = MultimodalModel({"vision": ModalEncoderModule(clip)}, llama)
    >>> # mllm.set_modality_token_ids({"vision": 32000})
    >>> # out = mllm(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=pixels)
    """

    def __init__(
        self,
        encoders: Mapping[str, ModalEncoderModule],
        language_model: PreTrainedModel,
        init_projector_type: str = "linear",
        init_activation: str = "gelu",
    ):
        super().__init__()
        validate_projection(init_projector_type, init_activation)
        if not isinstance(encoders, Mapping):
            raise ValueError(f"encoders must be a dict of modality key → ModalEncoderModule, got {type(encoders).__name__}.")
        self.language_model = language_model
        llm_hidden = language_model.get_input_embeddings().weight.shape[-1]
        for key, encoder in encoders.items():
            if not isinstance(key, str) or not key.isidentifier():
                raise ValueError(f"Encoder key {key!r} must be a Python identifier (it becomes the attribute {key}_encoder).")
            if not isinstance(encoder, ModalEncoderModule):
                raise ValueError(
                    f"encoders[{key!r}] is a {type(encoder).__name__}; wrap it: ModalEncoderModule({type(encoder).__name__}...)."
                )
            if encoder.projector is None:
                encoder.projector = self._new_projector(encoder, llm_hidden, init_projector_type, init_activation)
            else:
                self._check_projector(key, encoder, llm_hidden)
            setattr(self, f"{key}_encoder", encoder)
        self._encoder_keys = tuple(encoders)
        self.modality_token_ids: dict[str, int] = {}
        # Distributed training sets this: encoders without inputs then run on a placeholder item (zero features).
        self.encode_absent = False
        self._lm_arguments: frozenset[str] | None = None
        # In training with labels, compute the LM head and loss only at supervised positions (see forward).
        self.supervised_logits_only = True
        self._loss_chunk_size: int | None = None
        self._warned_unfusable = False

    @staticmethod
    def _new_projector(encoder: ModalEncoderModule, llm_hidden: int, kind: str, activation: str) -> MultimodalProjector:
        config = MultimodalProjectorConfig(
            in_features=encoder.hidden_size, out_features=llm_hidden, projection_type=kind, activation=activation
        )
        reference = next(encoder.module.parameters(), None)
        projector = MultimodalProjector(config)
        if reference is not None:
            projector = projector.to(device=reference.device, dtype=reference.dtype)
        return projector

    @staticmethod
    def _check_projector(key: str, encoder: ModalEncoderModule, llm_hidden: int) -> None:
        config = encoder.projector.config
        if config.out_features is not None and config.out_features != llm_hidden:
            raise ValueError(
                f"The {key} projector outputs {config.out_features} features but the language model's embeddings "
                f"are {llm_hidden} wide."
            )
        widened = encoder.postprocess_module_callback is not None  # a callback may change the width
        if config.in_features is not None and not widened and config.in_features != encoder.hidden_size:
            raise ValueError(
                f"The {key} projector takes {config.in_features} features but the {key} encoder outputs "
                f"{encoder.hidden_size}."
            )

    @property
    def loss_chunk_size(self) -> int | None:
        """In training with labels, fuse the LM head and loss and run them this many supervised tokens at a time,
        without keeping logits (:mod:`.chunked_loss`); None (the default): the LM's own head.

        Raises:
            ValueError: when set to anything but None or a positive integer.
        """
        return self._loss_chunk_size

    @loss_chunk_size.setter
    def loss_chunk_size(self, value: int | None) -> None:
        self._loss_chunk_size = check_chunk_size(value)

    # ----------------------------------------------------------------------------------------------- structure
    @property
    def encoders(self) -> dict[str, ModalEncoderModule]:
        """Modality key → :class:`ModalEncoderModule`."""
        return {key: getattr(self, f"{key}_encoder") for key in self._encoder_keys}

    def set_modality_token_ids(self, token_ids: Mapping[str, int]) -> None:
        """Set the placeholder token id of each modality (ids may lie outside the LM's vocabulary).

        Raises:
            ValueError: for a key that names no encoder.
        """
        unknown = set(token_ids) - set(self._encoder_keys)
        if unknown:
            raise ValueError(f"No encoder for modality {sorted(unknown)}; encoders: {list(self._encoder_keys)}.")
        self.modality_token_ids.update({k: int(v) for k, v in token_ids.items()})

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    @property
    def device(self) -> torch.device:
        return self.language_model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.dtype

    # ----------------------------------------------------------------------------------------------- forward
    def route_inputs(
        self, kwargs: dict[str, Any], encoder_inputs: Mapping[str, Mapping[str, Any]] | None = None
    ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        """Split keyword arguments into per-encoder inputs and the rest (for the language model).

        A keyword goes to the one encoder whose ``forward`` names it; ``encoder_inputs={"vision": {...}}`` names
        the encoder explicitly. ``None`` values and encoders left without inputs are dropped.

        Raises:
            ValueError: for an unknown key in ``encoder_inputs``, or a keyword several encoders accept.
        """
        routed: dict[str, dict[str, Any]] = {}
        for key, inputs in (encoder_inputs or {}).items():
            if key not in self._encoder_keys:
                raise ValueError(f"encoder_inputs names {key!r}, which is no encoder; encoders: {list(self._encoder_keys)}.")
            routed[key] = dict(inputs)
        rest: dict[str, Any] = {}
        encoders = self.encoders
        for name, value in kwargs.items():
            owners = [key for key, enc in encoders.items() if name in enc.input_names]
            if not owners:
                rest[name] = value
            elif len(owners) > 1:
                raise ValueError(
                    f"{name!r} is accepted by several encoders ({owners}); pass it as "
                    f"encoder_inputs={{{owners[0]!r}: {{{name!r}: ...}}, ...}} instead."
                )
            else:
                routed.setdefault(owners[0], {}).setdefault(name, value)
        routed = {k: {n: v for n, v in d.items() if v is not None} for k, d in routed.items()}
        return {k: d for k, d in routed.items() if _has_items(d)}, rest

    def encode(self, routed: Mapping[str, Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Run each encoder that has inputs, in encoder order; features ``[n_features, llm_hidden]`` per modality.

        With ``encode_absent`` (set for distributed training), an encoder without inputs runs on a placeholder
        item (:func:`cornstarch.models.dummy_inputs.dummy_inputs`) and contributes its features sliced to zero
        rows: the merge is unchanged, its parameters join the graph with zero gradients, and every rank runs the
        same encoders in the same order.

        Raises:
            ValueError: for a modality whose placeholder token id was never set.
        """
        features = {}
        keys = self._encoder_keys if self.encode_absent else tuple(routed)
        for key in keys:
            if key not in routed:  # only with encode_absent
                features[key] = self.encoders[key](**dummy_inputs(self.encoders[key]))[:0]  # [0, llm_hidden]
                continue
            if key not in self.modality_token_ids:
                raise ValueError(
                    f"Modality {key!r} has inputs but no token id: call set_modality_token_ids({{{key!r}: id}}) "
                    "(MultimodalProcessor does it when given the model)."
                )
            features[key] = self.encoders[key](**routed[key])
        return features

    def embed(
        self, input_ids: torch.Tensor, features: dict[str, torch.Tensor], labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[batch, seq]`` ids + features → ``[batch, seq, hidden]`` embeddings (and labels, -100 at placeholders)."""
        return merge_embeddings(input_ids, self.get_input_embeddings(), features, self.modality_token_ids, labels)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_inputs: Mapping[str, Mapping[str, Any]] | None = None,
        supervised_positions: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """Encode every modality present, merge into the text embeddings and run the language model.

        Args:
            input_ids: ``[batch, seq]`` with each modality's placeholder expanded to its feature count.
            attention_mask: ``[batch, seq]``, passed to the LM as is (left or right padding).
            labels: ``[batch, seq]``; positions of modality tokens are set to -100.
            position_ids: passed to the LM.
            inputs_embeds: precomputed embeddings (then no modality input may be given).
            encoder_inputs: explicit per-encoder inputs, e.g. ``{"vision": {"pixel_values": ...}}``.
            supervised_positions: flat positions whose next token is supervised (``supervised_loss.
                supervised_positions(labels)``, computed by the data layer on the CPU); derived from CPU labels
                when not given.
            **kwargs: modality inputs (``pixel_values``, ``input_features``, …) routed to the encoder that takes
                them; anything else goes to the language model.

        Returns:
            The language model's output (``loss``, ``logits`` ``[batch, seq, vocab]``, …). In training with labels
            (and ``supervised_logits_only``, the default) the LM head and loss run only where a token is
            supervised: a :class:`MultimodalCausalLMOutput` with ``logits`` ``[1, n_supervised, vocab]`` at the
            flat positions ``logits_positions``; the loss is the same. With ``loss_chunk_size`` set (tokens per
            chunk) the head and loss are fused and chunked (:mod:`.chunked_loss`): ``logits`` is None and
            ``predictions`` ``[1, n_supervised]`` holds their argmax.
        """
        routed, lm_kwargs = self.route_inputs(kwargs, encoder_inputs)
        self._check_lm_kwargs(lm_kwargs)
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("MultimodalModel.forward needs input_ids (or inputs_embeds).")
            inputs_embeds, labels = self.embed(input_ids, self.encode(routed), labels)
        elif routed:
            raise ValueError("Give input_ids, not inputs_embeds, together with modality inputs.")
        if position_ids is not None:
            lm_kwargs["position_ids"] = position_ids
        if labels is not None:  # training: no KV cache to build (and packed rows need none to be detected)
            lm_kwargs.setdefault("use_cache", False)
        positions = self._supervised_positions(labels, supervised_positions)
        if positions is None:
            return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels,
                                       **lm_kwargs)
        return self._supervised_forward(inputs_embeds, attention_mask, labels, positions, lm_kwargs)

    def _supervised_forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                            labels: torch.Tensor, positions: torch.Tensor,
                            lm_kwargs: dict[str, Any]) -> MultimodalCausalLMOutput:
        """The LM with its head and loss only at the flat ``positions``: the LM's own head on ``[1, n, hidden]``,
        or, with ``loss_chunk_size`` and a head :func:`.chunked_loss.fusable_head` accepts, the fused chunked
        head and loss (no logits kept; ``predictions`` instead)."""
        num_items = lm_kwargs.pop("num_items_in_batch", None)
        targets = next_token_targets(labels, positions)  # [1, n_supervised]
        fused = self._fused_head()
        if fused is not None:
            head, softcap = fused
            out = self.language_model.get_decoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                                    **lm_kwargs)
            hidden = at_positions(out.last_hidden_state, positions)[0]  # [n_supervised, hidden]
            loss, predictions = chunked_head_loss(hidden, head.weight, head.bias, targets[0], self.loss_chunk_size,
                                                  softcap, num_items)
            logits, predictions = None, predictions[None]  # [1, n_supervised]
        else:
            with HiddenStatesAt(self.language_model.get_decoder(), positions):
                out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **lm_kwargs)
            # out.logits: [1, n_supervised, vocab], logits[0, j] predicting the token after flat position positions[j]
            logits, predictions = out.logits, None
            loss = causal_lm_loss(logits, targets, num_items)
        return MultimodalCausalLMOutput(loss=loss, logits=logits, logits_positions=positions, predictions=predictions,
                                        cache=getattr(out, "cache", None), hidden_states=out.hidden_states,
                                        attentions=out.attentions)

    def _fused_head(self) -> tuple[nn.Linear, float | None] | None:
        """The head for the chunked loss when ``loss_chunk_size`` is set; warns once if the LM's head does not
        qualify (its own head then runs, with logits)."""
        if self.loss_chunk_size is None:
            return None
        fused = fusable_head(self.language_model)
        if fused is None and not self._warned_unfusable:
            self._warned_unfusable = True
            warnings.warn(f"loss_chunk_size is set but the language model's head "
                          f"({type(self.language_model.get_output_embeddings()).__name__} of model_type "
                          f"{getattr(self.language_model.config, 'model_type', None)!r}) is not one chunked_loss "
                          "reproduces; its own head computes the logits instead.", stacklevel=3)
        return fused

    def _supervised_positions(self, labels: torch.Tensor | None, given: torch.Tensor | None) -> torch.Tensor | None:
        """Flat positions to compute logits at, or None for the language model's own full-logits forward.

        Only in training with labels and ``supervised_logits_only``: then the ``supervised_positions`` the data
        layer computed on the CPU, or else positions derived from CPU labels. Labels already on an accelerator
        without them take the full path, so that ``forward`` never waits for the device.
        """
        if labels is None or not (self.training and self.supervised_logits_only):
            return None
        if given is not None:
            return given
        return supervised_positions_of(labels) if labels.device.type == "cpu" else None

    def _check_lm_kwargs(self, lm_kwargs: Mapping[str, Any]) -> None:
        """Refuse keywords no encoder and no LM argument takes (a typo would otherwise be ignored silently)."""
        if not lm_kwargs:
            return
        if self._lm_arguments is None:
            params = inspect.signature(self.language_model.forward).parameters.values()
            named = {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
            self._lm_arguments = frozenset(named | _TRANSFORMERS_KWARGS | {"return_dict"})
        unknown = sorted(set(lm_kwargs) - self._lm_arguments)
        if unknown:
            raise ValueError(
                f"Unknown input(s) {unknown}: no encoder's forward and no language-model argument takes them. For "
                "inputs only a callback reads (e.g. image_sizes), use encoder_inputs={'vision': {...}}."
            )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_inputs: Mapping[str, Mapping[str, Any]] | None = None,
        supervised_positions: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """Generate with the same modality inputs as :meth:`forward`; returns prompt + new tokens like HF.

        Extra keyword arguments that no encoder takes go to ``language_model.generate``; ``supervised_positions``
        (a train batch's) is accepted and ignored.
        """
        routed, generate_kwargs = self.route_inputs(kwargs, encoder_inputs)
        inputs_embeds, _ = self.embed(input_ids, self.encode(routed))
        placeholders = modality_masks(input_ids, self.modality_token_ids).values()
        safe_ids = input_ids
        for mask in placeholders:  # ids the LM can embed, for logits processors that look at the prompt
            safe_ids = safe_ids.masked_fill(mask, 0)
        output = self.language_model.generate(
            input_ids=safe_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generate_kwargs
        )
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        sequences[:, : input_ids.shape[1]] = input_ids
        return output

    # ----------------------------------------------------------------------------------------------- training
    def train(
        self,
        mode: bool | Mapping[str, tuple[bool, bool]] = True,
        encoders_mode: Mapping[str, tuple[bool, bool]] | None = None,
        llm_mode: bool | None = None,
    ) -> "MultimodalModel":
        """``nn.Module.train``, plus freezing as the reference describes.

        ``mllm.train(encoders_mode={"vision": (module_trains, projector_trains)}, llm_mode=False)`` sets
        ``requires_grad`` of each named encoder module / projector and of the LM (``None``: unchanged). A part
        whose parameters are all frozen is kept in eval mode (no dropout); the rest follow ``mode``.

        Raises:
            ValueError: for an unknown key in ``encoders_mode`` or a value that is not a pair of booleans.
        """
        if isinstance(mode, Mapping):
            mode, encoders_mode = True, mode
        for key, pair in (encoders_mode or {}).items():
            if key not in self._encoder_keys:
                raise ValueError(f"train(encoders_mode=...) names {key!r}, which is no encoder; encoders: {list(self._encoder_keys)}.")
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(b, bool) for b in pair)):
                raise ValueError(f"encoders_mode[{key!r}] must be (module_trains: bool, projector_trains: bool), got {pair!r}.")
            encoder = self.encoders[key]
            encoder.module.requires_grad_(pair[0])
            encoder.projector.requires_grad_(pair[1])
        if llm_mode is not None:
            self.language_model.requires_grad_(bool(llm_mode))
        super().train(mode)
        if mode:
            for part in self._parts():
                if _is_frozen(part):
                    part.eval()
        return self

    def _parts(self) -> list[nn.Module]:
        parts: list[nn.Module] = []
        for encoder in self.encoders.values():
            parts += [encoder.module, encoder.projector]
        return parts + [self.language_model]

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """Turn on activation checkpointing in the LM and every encoder that supports it."""
        kwargs = gradient_checkpointing_kwargs or {"use_reentrant": False}
        for part in self._parts():
            if not getattr(part, "supports_gradient_checkpointing", False):
                continue
            if hasattr(part, "activation_checkpointing_enable"):  # transformers >= 5.2 name
                part.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                part.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def gradient_checkpointing_disable(self) -> None:
        for part in self._parts():
            if not getattr(part, "supports_gradient_checkpointing", False):
                continue
            if hasattr(part, "activation_checkpointing_disable"):
                part.activation_checkpointing_disable()
            else:
                part.gradient_checkpointing_disable()

    # ----------------------------------------------------------------------------------------------- save / load
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
                    name: import_path(fn) for name in CALLBACK_NAMES if (fn := getattr(encoder, name)) is not None
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


def _has_items(inputs: Mapping[str, Any]) -> bool:
    """Whether an encoder's inputs hold anything to encode (an empty batch of items counts as absent)."""
    tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor)]
    if not tensors:
        return bool(inputs)
    return any(t.numel() > 0 for t in tensors)


def _encoder_kwargs(key: str, spec: Mapping[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """ModalEncoderModule arguments for a saved encoder: the given ones, else the saved projector and callbacks."""
    kwargs = dict(given)
    kwargs.setdefault("feature_layer", spec.get("feature_layer"))
    for name, path in spec.get("callbacks", {}).items():
        if name in kwargs:
            continue
        if path == UNSERIALIZABLE:
            raise ValueError(
                f"The {key} encoder was saved with a {name} that is not an importable module-level function; pass "
                f"it again: from_pretrained(..., encoders_kwargs={{{key!r}: {{{name!r}: fn}}}})."
            )
        kwargs[name] = resolve(path)
    if "projector" not in kwargs:
        projector_config = MultimodalProjectorConfig.from_dict(spec["projector"])
        if spec.get("custom_projection"):
            raise ValueError(
                f"The {key} projector wraps a custom module ({spec['custom_projection']}); pass it again: "
                f"from_pretrained(..., encoders_kwargs={{{key!r}: {{'projector': MultimodalProjector(config, projection=...)}}}})."
            )
        kwargs["projector"] = MultimodalProjector(projector_config)
    return kwargs
