"""Freeze/unfreeze schedules: which components train from which step or epoch on."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass
class Stage:
    """One stage of a freeze schedule.

    Args:
        train: components that train in this stage (``MultimodalModel.component_names()``: ``"{key}.module"``,
            ``"{key}.projector"``, ``"language_model"``, ``"lora"`` when LoRA is on). All others are frozen.
        start: first step (or epoch) of the stage.
        unit: ``"step"`` or ``"epoch"``.
        name: a label for logs.
    """

    train: list[str] = field(default_factory=list)
    start: int = 0
    unit: str = "step"
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or f"{self.unit} {self.start}+"


class FreezeSchedule:
    """Validated stages, and the stage in force at a step/epoch.

    Args:
        stages: the stages; ``None`` or empty means one stage in which everything trains.
        names: the model's component names (``MultimodalModel.component_names()``).

    Raises:
        ValueError: for a stage naming an unknown component, an unknown unit, mixed units, stages out of order, or
            a first stage not starting at 0.

    >>> s = FreezeSchedule([Stage(["vision.projector"]), Stage(["language_model"], start=10)],
    ...                    ["vision.module", "vision.projector", "language_model"])
    >>> s.index_at(step=9, epoch=0), s.index_at(step=10, epoch=0)
    (0, 1)
    """

    def __init__(self, stages: Sequence[Stage | Mapping] | None, names: Sequence[str]):
        stages = [s if isinstance(s, Stage) else Stage(**s) for s in (stages or [])]
        self.stages = stages or [Stage(train=list(names), name="all")]
        units = {s.unit for s in self.stages}
        if not units <= {"step", "epoch"}:
            raise ValueError(f"Stage unit must be 'step' or 'epoch', got {sorted(units - {'step', 'epoch'})}.")
        if len(units) > 1:
            raise ValueError("All stages of a freeze schedule must use the same unit (step or epoch).")
        starts = [s.start for s in self.stages]
        if starts[0] != 0 or starts != sorted(set(starts)):
            raise ValueError(f"Stage starts must begin at 0 and increase strictly, got {starts}.")
        for i, stage in enumerate(self.stages):
            unknown = [n for n in stage.train if n not in names]
            if unknown:
                raise ValueError(f"Freeze schedule stage {i} ({stage.label}) names {unknown}, which the model does not "
                                 f"have; components: {list(names)}.")
        self.unit = self.stages[0].unit

    def index_at(self, step: int, epoch: int) -> int:
        """Index of the stage in force at ``step``/``epoch``."""
        now = step if self.unit == "step" else epoch
        return max(i for i, s in enumerate(self.stages) if s.start <= now)

    def trained_until(self, index: int) -> list[str]:
        """Components that train in any stage up to ``index``, in first-training order."""
        seen: list[str] = []
        for stage in self.stages[: index + 1]:
            seen += [n for n in stage.train if n not in seen]
        return seen
