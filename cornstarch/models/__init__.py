"""Model layer: pure torch + transformers (no Lightning anywhere below here)."""

from .multimodal_language_model import (
    ModalEncoderModule,
    MultimodalModel,
    MultimodalModelConfig,
    MultimodalProcessor,
    MultimodalProjector,
    MultimodalProjectorConfig,
)

__all__ = [
    "ModalEncoderModule",
    "MultimodalModel",
    "MultimodalModelConfig",
    "MultimodalProcessor",
    "MultimodalProjector",
    "MultimodalProjectorConfig",
]
