"""Lightning layer: the LightningModule, freeze schedules, optimizer groups and the CLI (glue only)."""

from .module import GenerationSpec, LoraSpec, MultimodalLitModule
from .optim import OptimizerConfig, WarmupCosine
from .schedule import FreezeSchedule, Stage

__all__ = [
    "FreezeSchedule",
    "GenerationSpec",
    "LoraSpec",
    "MultimodalLitModule",
    "OptimizerConfig",
    "Stage",
    "WarmupCosine",
]
