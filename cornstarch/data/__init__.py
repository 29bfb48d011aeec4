"""Data layer: samples → collated multimodal batches (media, chat text, placeholder expansion, labels)."""

from .collator import MultimodalCollator
from .datamodule import DatasetSpec, MultimodalDataModule
from .media import SampleError, SampleWarning, load_audio, load_image
from .sampling import EpochShuffleSampler, LengthGroupedSampler

__all__ = [
    "DatasetSpec",
    "EpochShuffleSampler",
    "LengthGroupedSampler",
    "MultimodalCollator",
    "MultimodalDataModule",
    "SampleError",
    "SampleWarning",
    "load_audio",
    "load_image",
]
