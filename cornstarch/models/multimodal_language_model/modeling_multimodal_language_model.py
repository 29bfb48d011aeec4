"""The multimodal model: Hugging Face encoders, each with a projector, feeding a causal LM.

``MultimodalModel`` merges every modality's features into the LLM's input embeddings at the modality-token positions
and runs the LM. Its parts live next to it: :class:`.projector.MultimodalProjector` (features → LLM width),
:class:`.encoder_module.ModalEncoderModule` (one encoder with its callbacks and projector), :mod:`.components`
(what trains), :mod:`.saving` (``save_pretrained``/``from_pretrained``), :mod:`.training_loss` (the training loss:
:mod:`.supervised_loss`, :mod:`.chunked_loss`, :mod:`.moe`), :mod:`.native` (``from_hf``/``to_hf``), :mod:`.compiling` (``compile()``). The first two are importable from here too, as the reference page shows.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from ..dummy_inputs import dummy_inputs
from . import merging
from .compiling import compile_layers
from .components import TrainableComponents
from .configuration_multimodal_language_model import MultimodalProjectorConfig, validate_projection
from .encoder_module import LM_ARGUMENTS, ModalEncoderModule, hidden_size_of
from .generation import greedy_decode, plain_greedy_request
from .input_checks import (any_targets, check_distinct_token_ids, check_encoder_dtypes, check_finite_inputs,
                           check_text_inputs, zero_loss_without_targets)
from .language_models import check_language_model, check_packing, labels_for
from .merging import merge_embeddings, modality_masks
from .native import NativeInterop
from .projector import MultimodalProjector
from .saving import WEIGHTS_NAME, SaveLoad
from .training_loss import MultimodalCausalLMOutput, TrainingLoss

__all__ = ["LM_ARGUMENTS", "WEIGHTS_NAME", "ModalEncoderModule", "MultimodalCausalLMOutput", "MultimodalModel",
           "MultimodalProjector", "MultimodalProjectorConfig", "hidden_size_of"]

try:  # keyword arguments every transformers model forward accepts through **kwargs
    from transformers.utils.generic import TransformersKwargs

    _TRANSFORMERS_KWARGS = frozenset(TransformersKwargs.__required_keys__ | TransformersKwargs.__optional_keys__)
except ImportError:  # pragma: no cover
    _TRANSFORMERS_KWARGS = frozenset({"output_attentions", "output_hidden_states"})


class MultimodalModel(TrainingLoss, TrainableComponents, SaveLoad, NativeInterop, nn.Module):
    """A causal LM fed by any number of modality encoders.

    Args:
        encoders: modality key (``"vision"``, ``"audio"``, …) → :class:`ModalEncoderModule`. Each is also the
            attribute ``{key}_encoder``.
        language_model: a Hugging Face causal LM (``…ForCausalLM``) that takes ``inputs_embeds``
            (:mod:`.language_models`).
        init_projector_type: ``"linear"`` or ``"mlp"``, for encoders given without a projector.
        init_activation: a key of ``transformers.activations.ACT2CLS``, for ``"mlp"``.

    Raises:
        ValueError: for a language model that cannot take merged embeddings (an encoder-decoder, no input
            embeddings, …: the message names its class and the reason), an encoder that is not a
            ``ModalEncoderModule``, a bad key, an unknown projector type or activation, or a given projector whose
            sizes do not fit the encoder and the LLM.

    >>> from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
    >>> clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
    ...                                         num_attention_heads=2, image_size=8, patch_size=4))
    >>> llama = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8,
    ...                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    >>> mllm = MultimodalModel({"vision": ModalEncoderModule(clip)}, llama)
    >>> mllm.set_modality_token_ids({"vision": 16})  # outside the LM's vocabulary
    >>> ids = torch.tensor([[1] + [16] * 5 + [3, 4]])  # one 8x8 image: 4 patches + CLS = 5 features
    >>> out = mllm(input_ids=ids, labels=ids, pixel_values=torch.randn(1, 3, 8, 8))
    >>> out.logits.shape  # training mode with labels: logits only where a token is supervised
    torch.Size([1, 2, 16])
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
        check_language_model(language_model)
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
        # Plain greedy generate: decode steps through torch.compile with a static cache (generation.greedy_decode).
        self.compile_generation = False

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

    # ----------------------------------------------------------------------------------------------- structure
    @property
    def encoders(self) -> dict[str, ModalEncoderModule]:
        """Modality key → :class:`ModalEncoderModule`."""
        return {key: getattr(self, f"{key}_encoder") for key in self._encoder_keys}

    def set_modality_token_ids(self, token_ids: Mapping[str, int]) -> None:
        """Set the placeholder token id of each modality (ids may lie outside the LM's vocabulary).

        Raises:
            ValueError: for a key that names no encoder, or two modalities given the same id.
        """
        unknown = set(token_ids) - set(self._encoder_keys)
        if unknown:
            raise ValueError(f"No encoder for modality {sorted(unknown)}; encoders: {list(self._encoder_keys)}.")
        merged = {**self.modality_token_ids, **{k: int(v) for k, v in token_ids.items()}}
        check_distinct_token_ids(merged)
        self.modality_token_ids.update(merged)

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
            position_ids: passed to the LM. Without ``attention_mask`` they mark packed rows (positions restart
                per sample), refused for an LM that would let samples attend to each other
                (:func:`.language_models.supports_packing`).
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
            ``predictions`` ``[1, n_supervised]`` holds their argmax. For a mixture-of-experts LM asked for its router
            logits (``output_router_logits``) every path's ``loss`` includes the router loss, scaled as the LM
            scales it (:meth:`router_loss`). A batch whose labels supervise no token (all -100) has loss 0, with
            zero gradients, rather than NaN (and a warning when that is known without waiting for the device).

        Raises:
            ValueError: for an ``attention_mask`` or ``labels`` whose shape differs from ``input_ids``', integer
                ``pixel_values``/``input_features`` (raw pixels: run the processor), token ids outside the LM's
                vocabulary (on CPU; an asynchronous device assertion elsewhere), a modality token/feature count
                mismatch, or an unknown keyword.
        """
        routed, lm_kwargs = self.route_inputs(kwargs, encoder_inputs)
        self._check_lm_kwargs(lm_kwargs)
        has_cache = any(lm_kwargs.get(name) is not None for name in ("past_key_values", "cache"))
        check_text_inputs(input_ids, inputs_embeds, attention_mask, labels, has_cache)
        check_encoder_dtypes(routed)
        check_finite_inputs(routed, merging.on_host)
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("MultimodalModel.forward needs input_ids (or inputs_embeds).")
            inputs_embeds, labels = self.embed(input_ids, self.encode(routed), labels)
        elif routed:
            raise ValueError("Give input_ids, not inputs_embeds, together with modality inputs.")
        if position_ids is not None:
            if attention_mask is None:  # packed rows: samples separated by restarting positions only
                check_packing(self.language_model)
            lm_kwargs["position_ids"] = position_ids
        if labels is not None:  # training: no KV cache to build (and packed rows need none to be detected)
            lm_kwargs.setdefault("use_cache", False)
        positions = self._supervised_positions(labels, supervised_positions)
        if positions is None:
            out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                      labels=labels_for(self.language_model, labels), **lm_kwargs)
            return out if labels is None else zero_loss_without_targets(out, any_targets(labels))
        out = self._supervised_forward(inputs_embeds, attention_mask, labels, positions, lm_kwargs)
        return zero_loss_without_targets(out, positions.numel() > 0)

    def compile(self, **compile_kwargs: Any) -> None:
        """``torch.compile`` each encoder layer and decoder layer for training (:func:`.compiling.compile_layers`):
        the same loss and gradients, fewer memory-bound passes; evaluation and ``generate`` stay eager. The
        first training forward compiles (tens of seconds on a CPU), so it pays off on longer runs.

        Args:
            **compile_kwargs: passed to ``torch.compile`` (``mode``, ``dynamic``, ``backend``, …).
        """
        compile_layers(self, **compile_kwargs)

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
        (a train batch's) is accepted and ignored. A plain greedy request (no sampling, beams, logits processors,
        streamer or extra outputs) is decoded by :func:`.generation.greedy_decode` instead, with the same tokens
        and less overhead per token; anything else goes to ``language_model.generate``. With
        ``compile_generation = True`` its decode steps run through ``torch.compile`` with a static cache (a
        compilation per batch size, tens of seconds on a CPU; worth it for many calls of a small model).

        Raises:
            ValueError: for bad inputs, as :meth:`forward`.
        """
        routed, generate_kwargs = self.route_inputs(kwargs, encoder_inputs)
        check_text_inputs(input_ids, None, attention_mask, None, has_cache=False)
        check_encoder_dtypes(routed)
        check_finite_inputs(routed, merging.on_host)
        inputs_embeds, _ = self.embed(input_ids, self.encode(routed))
        placeholders = modality_masks(input_ids, self.modality_token_ids).values()
        safe_ids = input_ids
        for mask in placeholders:  # ids the LM can embed, for logits processors that look at the prompt
            safe_ids = safe_ids.masked_fill(mask, 0)
        request = plain_greedy_request(self.language_model, generate_kwargs)
        if request is not None:  # plain greedy: the lean loop, same tokens (generation.py)
            output = greedy_decode(self.language_model, safe_ids, inputs_embeds, attention_mask, request,
                                   compile=self.compile_generation)
        else:
            output = self.language_model.generate(
                input_ids=safe_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generate_kwargs
            )
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        sequences[:, : input_ids.shape[1]] = input_ids
        return output


def _has_items(inputs: Mapping[str, Any]) -> bool:
    """Whether an encoder's inputs hold anything to encode (an empty batch of items counts as absent)."""
    tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor)]
    if not tensors:
        return bool(inputs)
    return any(t.numel() > 0 for t in tensors)

