"""Data layer: samples → collated multimodal batches (media, chat text, placeholder expansion, labels)."""

from .collator import MultimodalCollator
from .datamodule import DatasetSpec, MultimodalDataModule
from .demo import (
    AUDIO_PLACEHOLDER,
    IMAGE_PLACEHOLDER,
    build_tokenizer,
    demo_root,
    digits_valm_dataset,
    digits_vlm_dataset,
    dtmf_tone,
    write_demo_files,
)
from .media import SampleError, load_audio, load_image
from .sampling import EpochShuffleSampler, LengthGroupedSampler

__all__ = [
    "AUDIO_PLACEHOLDER",
    "IMAGE_PLACEHOLDER",
    "build_tokenizer",
    "demo_root",
    "digits_valm_dataset",
    "digits_vlm_dataset",
    "dtmf_tone",
    "write_demo_files",
    "DatasetSpec",
    "EpochShuffleSampler",
    "LengthGroupedSampler",
    "MultimodalCollator",
    "MultimodalDataModule",
    "SampleError",
    "load_audio",
    "load_image",
]
