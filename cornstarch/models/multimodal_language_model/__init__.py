"""Compose a multimodal LLM from Hugging Face unimodal models (the reference page's public API)."""

from .configuration_multimodal_language_model import MultimodalModelConfig, MultimodalProjectorConfig
from .modeling_multimodal_language_model import ModalEncoderModule, MultimodalModel, MultimodalProjector
from .processing_multimodal_language_model import MultimodalProcessor

__all__ = [
    "ModalEncoderModule",
    "MultimodalModel",
    "MultimodalModelConfig",
    "MultimodalProcessor",
    "MultimodalProjector",
    "MultimodalProjectorConfig",
]
