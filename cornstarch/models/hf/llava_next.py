"""Llava-Next (``LlavaNextForConditionalGeneration``, ``LlavaNextProcessor``) ↔ :class:`MultimodalModel` /
:class:`MultimodalProcessor`.

A Llava-Next is a Llava whose vision encoder tiles images at any resolution (:mod:`cornstarch.models.anyres`):
:class:`~cornstarch.models.anyres.AnyresTiles`, a feature selection, the projector and
:class:`~cornstarch.models.anyres.PackImageFeatures`, which holds the learned ``image_newline``.
"""

from __future__ import annotations

from typing import Any

from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor

from ..anyres import AnyresTiles, PackImageFeatures, anyres_feature_count
from ..multimodal_language_model import ModalEncoderModule, MultimodalModel, MultimodalProcessor
from .common import (assemble, decoder_and_head, multimodal_model, no_callback, projector_layers, projector_of,
                     the_encoder, token_in_vocabulary)
from .llava import LlavaImageCount, chat_ready_tokenizer, count_settings, selection, selection_of, single_processor

NATIVE = LlavaNextForConditionalGeneration
PROCESSOR = LlavaNextProcessor
KEY = "vision"


class LlavaNextImageCount(LlavaImageCount):
    """Image features per image as ``LlavaNextProcessor`` counts them, from each image's size (``image_sizes``).

    A count function for :class:`MultimodalProcessor` (``num_feature_calculation_funcs``).

    Args:
        patch_size, num_additional_image_tokens, vision_feature_select_strategy: as :class:`LlavaImageCount`.
        image_grid_pinpoints: the grid resolutions (the image processor's).

    >>> import torch
    >>> count = LlavaNextImageCount(4, 1, "default", image_grid_pinpoints=[[8, 16], [16, 8], [16, 16]])
    >>> count({}, {"pixel_values": torch.zeros(2, 3, 3, 8, 8), "image_sizes": torch.tensor([[6, 13], [8, 8]])})
    [14, 10]
    """

    def __init__(self, patch_size: int, num_additional_image_tokens: int = 0,
                 vision_feature_select_strategy: str = "default", image_grid_pinpoints: list | None = None):
        super().__init__(patch_size, num_additional_image_tokens, vision_feature_select_strategy)
        self.image_grid_pinpoints = [list(p) for p in image_grid_pinpoints or []]

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "image_grid_pinpoints": self.image_grid_pinpoints}

    def __call__(self, inputs: dict, outputs: dict) -> list[int]:
        per_tile = super().__call__(inputs, outputs)[0]
        tile = outputs["pixel_values"].shape[-1]
        return [anyres_feature_count(h, w, per_tile, self.image_grid_pinpoints, tile, self.patch_size)
                for h, w in outputs["image_sizes"].tolist()]


# ----------------------------------------------------------------------------------------------- model
def import_model(native: LlavaNextForConditionalGeneration, drop_unused_layers: bool = False) -> MultimodalModel:
    """A :class:`MultimodalModel` holding a Llava-Next's modules (shared, not copied); its ``image_newline`` is
    the :class:`PackImageFeatures` callback's parameter.

    Args:
        native: the Llava-Next.
        drop_unused_layers: remove the vision layers after ``vision_feature_layer``, as for Llava.

    Raises:
        ValueError: as :func:`cornstarch.models.hf.llava.import_model`.
    """
    config, inner = native.config, native.model
    tile, patch = config.vision_config.image_size, config.vision_config.patch_size
    projector = projector_of([inner.multi_modal_projector.linear_1, inner.multi_modal_projector.linear_2],
                             config.projector_hidden_act)
    pack = PackImageFeatures(config.text_config.hidden_size, config.image_grid_pinpoints, tile, patch)
    pack.image_newline = inner.image_newline
    encoder = ModalEncoderModule(
        inner.vision_tower, projector=projector, preprocess_callback=AnyresTiles(config.image_grid_pinpoints, tile),
        postprocess_projector_callback=pack,
        **selection(config.vision_feature_layer, config.vision_feature_select_strategy, drop_unused_layers))
    return multimodal_model(native, KEY, encoder, config.image_token_id)


def export_model(mllm: MultimodalModel) -> LlavaNextForConditionalGeneration:
    """The ``LlavaNextForConditionalGeneration`` holding the model's modules (shared, not copied).

    Raises:
        ValueError: naming the part with no Llava-Next equivalent.
    """
    key, encoder, tower = the_encoder(mllm, "Llava-Next")
    layer, strategy = selection_of(encoder, key, "Llava-Next")
    tiles, pack = encoder.preprocess_callback, encoder.postprocess_projector_callback
    if not isinstance(tiles, AnyresTiles):
        no_callback(encoder, key, "Llava-Next", "preprocess_callback")
    if not isinstance(pack, PackImageFeatures):
        no_callback(encoder, key, "Llava-Next", "postprocess_projector_callback")
    tile, patch = tower.config.image_size, tower.config.patch_size
    settings = {"tile_size": tile, "patch_size": patch, "image_grid_pinpoints": tiles.image_grid_pinpoints}
    differ = [name for name, value in settings.items() if getattr(pack, name) != value]
    if tiles.tile_size != tile or differ:
        raise ValueError(f"The {key} encoder's anyres callbacks disagree with its tower or each other "
                         f"({', '.join(differ) or 'tile_size'}); Llava-Next has one setting of each.")
    (linear_1, linear_2), activation = projector_layers(encoder, key, "mlp", "Llava-Next")
    decoder, head = decoder_and_head(mllm.language_model, "Llava-Next")
    text_config = mllm.language_model.config
    config = LlavaNextConfig(
        vision_config=tower.config, text_config=text_config, image_grid_pinpoints=pack.image_grid_pinpoints,
        image_token_index=token_in_vocabulary(mllm, key, "Llava-Next"), vision_feature_layer=layer,
        vision_feature_select_strategy=strategy, projector_hidden_act=activation, multimodal_projector_bias=True,
        tie_word_embeddings=bool(text_config.tie_word_embeddings),
    )
    parts = {"model.vision_tower": tower, "model.multi_modal_projector.linear_1": linear_1,
             "model.multi_modal_projector.linear_2": linear_2, "model.image_newline": pack.image_newline,
             "model.language_model": decoder, "lm_head": head}
    return assemble(NATIVE, config, parts, mllm.language_model.generation_config)


def claims_model(mllm: MultimodalModel) -> bool:
    """Whether the model's one encoder packs anyres features (so Llava-Next is the native class)."""
    encoder = next(iter(mllm.encoders.values()))
    return len(mllm.encoders) == 1 and isinstance(encoder.postprocess_projector_callback, PackImageFeatures)


# ----------------------------------------------------------------------------------------------- processor
def import_processor(native: LlavaNextProcessor, model: MultimodalModel | None = None) -> MultimodalProcessor:
    """A :class:`MultimodalProcessor` giving a ``LlavaNextProcessor``'s ``input_ids``, ``pixel_values`` and
    ``image_sizes`` (each image expanded to its own feature count).

    Raises:
        ValueError: if the processor has no ``patch_size`` and no model is given to count features.
    """
    funcs = {}
    if native.patch_size is not None:
        funcs[KEY] = LlavaNextImageCount(native.patch_size, native.num_additional_image_tokens or 0,
                                         native.vision_feature_select_strategy or "default",
                                         native.image_processor.image_grid_pinpoints)
    elif model is None:
        raise ValueError("The LlavaNextProcessor has no patch_size, so it cannot count image features; give model=.")
    return MultimodalProcessor({KEY: native.image_processor}, chat_ready_tokenizer(native), model=model,
                               num_feature_calculation_funcs=funcs, predefined_tokens={KEY: native.image_token})


def export_processor(processor: MultimodalProcessor) -> LlavaNextProcessor:
    """The ``LlavaNextProcessor`` giving the same inputs.

    Raises:
        ValueError: for several encoder processors or a feature count with no Llava-Next equivalent.
    """
    key = single_processor(processor, "LlavaNextProcessor")
    settings = count_settings(processor, key, "LlavaNextProcessor", LlavaNextImageCount, (PackImageFeatures,))
    return LlavaNextProcessor(image_processor=processor.encoder_processors[key], tokenizer=processor.tokenizer,
                              chat_template=processor.tokenizer.chat_template, image_token=processor.tokens[key],
                              **settings)


def claims_processor(processor: MultimodalProcessor) -> bool:
    """Whether the processor's one image processor tiles images (it has ``image_grid_pinpoints``)."""
    return len(processor.encoder_processors) == 1 and hasattr(
        next(iter(processor.encoder_processors.values())), "image_grid_pinpoints")


__all__ = ["LlavaNextImageCount", "claims_model", "claims_processor", "export_model", "export_processor",
           "import_model", "import_processor"]
