"""Llava (``LlavaForConditionalGeneration``, ``LlavaProcessor``) ↔ :class:`MultimodalModel` / :class:`MultimodalProcessor`.

A Llava is one vision encoder (``"vision"``) whose features are selected by ``vision_feature_layer`` and
``vision_feature_select_strategy`` (:class:`~cornstarch.models.feature_selection.SelectFeatures`), a
Linear → activation → Linear projector and a causal LM.
"""

from __future__ import annotations

from typing import Any

from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from ..feature_counts import FeatureCounter
from ..feature_selection import (
    SelectFeatures,
    penultimate_layer,
    penultimate_layer_without_cls,
    request_hidden_states,
    without_cls,
)
from ..multimodal_language_model import ModalEncoderModule, MultimodalModel, MultimodalProcessor
from .common import (assemble, decoder_and_head, multimodal_model, no_callback, projector_layers, projector_of,
                     the_encoder, token_in_vocabulary)

NATIVE = LlavaForConditionalGeneration
PROCESSOR = LlavaProcessor
KEY = "vision"
# Towers whose output (element 0) is their last layer's raw output, i.e. hidden_states[-1].
RAW_LAST_OUTPUT = frozenset({"clip_vision_model"})
# Towers with a CLS token before the patches (one more feature than patches per image).
WITH_CLS = frozenset({"clip_vision_model", "vit", "dinov2"})
# Module-level selection callbacks → (vision_feature_layer, strategy); None: the encoder's output (element 0).
KNOWN_SELECTIONS = {without_cls: (None, "default"), penultimate_layer_without_cls: (-2, "default"),
                    penultimate_layer: (-2, "full")}


class LlavaImageCount:
    """Image features per item as ``LlavaProcessor`` counts them: patches (+ extra tokens), minus CLS with
    ``"default"``. A count function for :class:`MultimodalProcessor` (``num_feature_calculation_funcs``).

    Args:
        patch_size: the vision tower's patch size.
        num_additional_image_tokens: tokens the tower adds to the patches (1 for a CLS token).
        vision_feature_select_strategy: ``"default"`` (CLS dropped) or ``"full"``.

    >>> import torch
    >>> count = LlavaImageCount(patch_size=8, num_additional_image_tokens=1, vision_feature_select_strategy="default")
    >>> count({}, {"pixel_values": torch.zeros(2, 3, 32, 32)})
    [16, 16]
    """

    def __init__(self, patch_size: int, num_additional_image_tokens: int = 0,
                 vision_feature_select_strategy: str = "default"):
        self.patch_size = patch_size
        self.num_additional_image_tokens = num_additional_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy

    def get_config(self) -> dict[str, Any]:
        return {"patch_size": self.patch_size, "num_additional_image_tokens": self.num_additional_image_tokens,
                "vision_feature_select_strategy": self.vision_feature_select_strategy}

    def __call__(self, inputs: dict, outputs: dict) -> list[int]:
        pixel_values = outputs["pixel_values"]
        height, width = pixel_values.shape[-2:]
        count = (height // self.patch_size) * (width // self.patch_size) + self.num_additional_image_tokens
        count -= self.vision_feature_select_strategy == "default"
        return [int(count)] * pixel_values.shape[0]


# ----------------------------------------------------------------------------------------------- model
def selection(layer: int | list[int], strategy: str, drop_unused_layers: bool) -> dict[str, Any]:
    """``ModalEncoderModule`` arguments selecting Llava's vision features.

    Raises:
        ValueError: for ``drop_unused_layers`` with several feature layers.
    """
    if not drop_unused_layers:
        return {"postprocess_module_callback": SelectFeatures(layer, strategy)}
    if not isinstance(layer, int):
        raise ValueError(f"drop_unused_layers needs one vision_feature_layer; this model concatenates {layer}.")
    return {"feature_layer": layer, "postprocess_module_callback": SelectFeatures(None, strategy)}


def import_model(native: LlavaForConditionalGeneration, drop_unused_layers: bool = False) -> MultimodalModel:
    """A :class:`MultimodalModel` holding a Llava's modules (shared, not copied).

    Args:
        native: the Llava.
        drop_unused_layers: remove the vision layers after ``vision_feature_layer`` (never computed; the model
            exports back to a Llava with the shorter tower and the same logits).

    Raises:
        ValueError: for a projector without bias, or ``drop_unused_layers`` with several feature layers.
    """
    config = native.config
    inner = native.model
    projector = projector_of([inner.multi_modal_projector.linear_1, inner.multi_modal_projector.linear_2],
                             config.projector_hidden_act)
    select = selection(config.vision_feature_layer, config.vision_feature_select_strategy, drop_unused_layers)
    encoder = ModalEncoderModule(inner.vision_tower, projector=projector, **select)
    return multimodal_model(native, KEY, encoder, config.image_token_id)


def selection_of(encoder: ModalEncoderModule, key: str, native: str) -> tuple[int | list[int], str]:
    """``(vision_feature_layer, vision_feature_select_strategy)`` equivalent to the encoder's
    ``postprocess_module_callback``.

    Raises:
        ValueError: naming a callback with no such equivalent.
    """
    select = encoder.postprocess_module_callback
    if isinstance(select, SelectFeatures):
        layer, strategy = select.layer, select.strategy
    elif select in KNOWN_SELECTIONS:
        layer, strategy = KNOWN_SELECTIONS[select]
    elif select is None:
        layer, strategy = None, "full"
    else:
        no_callback(encoder, key, native, "postprocess_module_callback")
    if layer is not None:
        return layer, strategy
    model_type = encoder.module.config.model_type
    if encoder.feature_layer is None and model_type not in RAW_LAST_OUTPUT:
        raise ValueError(f"The {key} encoder's features are its {model_type} output, which is normalised after the "
                         f"last layer; {native} takes raw hidden states: select them with "
                         "SelectFeatures(layer=-1, strategy=...).")
    return -1, strategy


def export_model(mllm: MultimodalModel) -> LlavaForConditionalGeneration:
    """The ``LlavaForConditionalGeneration`` holding the model's modules (shared, not copied).

    Raises:
        ValueError: naming the part with no Llava equivalent.
    """
    key, encoder, tower = the_encoder(mllm, "Llava")
    layer, strategy = selection_of(encoder, key, "Llava")
    if not (encoder.preprocess_callback is request_hidden_states and encoder.postprocess_module_callback in
            KNOWN_SELECTIONS):  # the reference page's way of selecting layer -2
        no_callback(encoder, key, "Llava", "preprocess_callback")
    no_callback(encoder, key, "Llava", "postprocess_projector_callback")
    (linear_1, linear_2), activation = projector_layers(encoder, key, "mlp", "Llava")
    decoder, head = decoder_and_head(mllm.language_model, "Llava")
    text_config = mllm.language_model.config
    config = LlavaConfig(
        vision_config=tower.config, text_config=text_config, image_token_index=token_in_vocabulary(mllm, key, "Llava"),
        vision_feature_layer=layer, vision_feature_select_strategy=strategy, projector_hidden_act=activation,
        multimodal_projector_bias=True, tie_word_embeddings=bool(text_config.tie_word_embeddings),
    )
    parts = {"model.vision_tower": tower, "model.multi_modal_projector.linear_1": linear_1,
             "model.multi_modal_projector.linear_2": linear_2, "model.language_model": decoder, "lm_head": head}
    return assemble(LlavaForConditionalGeneration, config, parts, mllm.language_model.generation_config)


def claims_model(mllm: MultimodalModel) -> bool:
    """Whether the model's one encoder takes images (so Llava is the native class to export to)."""
    return len(mllm.encoders) == 1 and "pixel_values" in next(iter(mllm.encoders.values())).input_names


# ----------------------------------------------------------------------------------------------- processor
def chat_ready_tokenizer(native: Any) -> Any:
    """The native processor's tokenizer, given the processor's chat template (which the processor applies)."""
    tokenizer = native.tokenizer
    if getattr(native, "chat_template", None):
        tokenizer.chat_template = native.chat_template
    return tokenizer


def import_processor(native: LlavaProcessor, model: MultimodalModel | None = None) -> MultimodalProcessor:
    """A :class:`MultimodalProcessor` giving a ``LlavaProcessor``'s ``input_ids`` and ``pixel_values``.

    Raises:
        ValueError: if the processor has no ``patch_size`` and no model is given to count features.
    """
    funcs = {}
    if native.patch_size is not None:
        funcs[KEY] = LlavaImageCount(native.patch_size, native.num_additional_image_tokens or 0,
                                     native.vision_feature_select_strategy or "default")
    elif model is None:
        raise ValueError("The LlavaProcessor has no patch_size, so it cannot count image features; give model=.")
    return MultimodalProcessor({KEY: native.image_processor}, chat_ready_tokenizer(native), model=model,
                               num_feature_calculation_funcs=funcs, predefined_tokens={KEY: native.image_token})


def count_settings(processor: MultimodalProcessor, key: str, native: str, count_class: type = LlavaImageCount,
                   packing: tuple[type, ...] = ()) -> dict[str, Any]:
    """``patch_size``, ``num_additional_image_tokens`` and ``vision_feature_select_strategy`` of a processor's
    image feature count: a ``count_class`` object, or the count of a Llava-like model's encoder whose callbacks
    select features (and, of the ``packing`` types, pack them).

    Raises:
        ValueError: for a count with no such settings.
    """
    counter = processor.counters.get(key)
    if isinstance(counter, count_class):
        return {name: counter.get_config()[name] for name in
                ("patch_size", "num_additional_image_tokens", "vision_feature_select_strategy")}
    if isinstance(counter, FeatureCounter) and hasattr(counter.config, "patch_size"):
        strategy = _strategy([cb for cb in counter.callbacks if not isinstance(cb, packing)])
        if strategy is not None:
            return {"patch_size": counter.config.patch_size, "vision_feature_select_strategy": strategy,
                    "num_additional_image_tokens": int(counter.config.model_type in WITH_CLS)}
    raise ValueError(f"The {key} feature count ({type(counter).__name__}) has no {native} equivalent "
                     "(patch size, extra tokens and selection strategy).")


def _strategy(callbacks: list) -> str | None:
    """The selection strategy of an encoder's count-changing callbacks; None if they do more than select."""
    strategies = []
    for callback in callbacks:
        if isinstance(callback, SelectFeatures):
            strategies.append(callback.strategy)
        elif callback in KNOWN_SELECTIONS:
            strategies.append(KNOWN_SELECTIONS[callback][1])
        else:
            return None
    return "full" if not strategies else strategies[0] if len(strategies) == 1 else None


def export_processor(processor: MultimodalProcessor) -> LlavaProcessor:
    """The ``LlavaProcessor`` giving the same ``input_ids`` and ``pixel_values``.

    Raises:
        ValueError: for several encoder processors or a feature count with no Llava equivalent.
    """
    key = single_processor(processor, "LlavaProcessor")
    return LlavaProcessor(image_processor=processor.encoder_processors[key], tokenizer=processor.tokenizer,
                          chat_template=processor.tokenizer.chat_template, image_token=processor.tokens[key],
                          **count_settings(processor, key, "LlavaProcessor"))


def single_processor(processor: MultimodalProcessor, native: str) -> str:
    """The key of the processor's one encoder processor.

    Raises:
        ValueError: naming the encoder processors when there is not exactly one.
    """
    if len(processor.encoder_processors) != 1:
        raise ValueError(f"{native} holds one encoder processor; this processor has "
                         f"{len(processor.encoder_processors)}: {list(processor.encoder_processors)}.")
    return next(iter(processor.encoder_processors))


def claims_processor(processor: MultimodalProcessor) -> bool:
    """Whether the processor has one image processor (so ``LlavaProcessor`` is the native class)."""
    return len(processor.encoder_processors) == 1 and "pixel_values" in getattr(
        next(iter(processor.encoder_processors.values())), "model_input_names", ())
