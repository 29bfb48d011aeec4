"""cornstarch: build, train and run multimodal LLMs out of Hugging Face unimodal models."""

from .models import (
    ModalEncoderModule,
    MultimodalModel,
    MultimodalModelConfig,
    MultimodalProcessor,
    MultimodalProjector,
    MultimodalProjectorConfig,
)

__version__ = "0.1.0"

__all__ = [
    "ModalEncoderModule",
    "MultimodalModel",
    "MultimodalModelConfig",
    "MultimodalProcessor",
    "MultimodalProjector",
    "MultimodalProjectorConfig",
    "__version__",
]
