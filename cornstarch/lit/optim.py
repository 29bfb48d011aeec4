"""Optimizer settings with per-component learning rates, and a warmup + cosine schedule."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class OptimizerConfig:
    """AdamW with a learning rate per component.

    Args:
        lr: default learning rate.
        lr_groups: component → learning rate, e.g. ``{"vision.projector": 1e-3, "language_model": 2e-5}``.
        weight_decay: applied to weight matrices only (not to biases, norms or 1-D parameters).
        betas, eps: AdamW's.
        warmup_steps: linear warmup from 0.
        schedule: ``"cosine"`` (to ``min_lr_ratio × lr`` at the last step) or ``"constant"``.
        min_lr_ratio: floor of the cosine decay.
        fused: torch's fused AdamW kernel (one kernel for all parameters; CPU and CUDA; transformers' default
            optimizer): the same update, fewer passes over memory.
        in_backward: step each parameter during backward as soon as its gradient is complete, then free the
            gradient (:class:`~cornstarch.lit.step_in_backward.StepInBackward`): the same updates with about the
            trainable parameters' size less peak memory. Single device, no gradient clipping or accumulation.
    """

    lr: float = 1e-3
    lr_groups: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    fused: bool = True
    in_backward: bool = False

    def validate(self, names: Sequence[str]) -> None:
        """Raise ``ValueError`` for a learning-rate group naming an unknown component, a negative ``warmup_steps``
        or an unknown schedule."""
        unknown = [n for n in self.lr_groups if n not in names]
        if unknown:
            raise ValueError(f"optimizer.lr_groups names {unknown}, which the model does not have; components: "
                             f"{list(names)}.")
        if self.warmup_steps < 0:
            raise ValueError(f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}.")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"optimizer.schedule must be 'cosine' or 'constant', got {self.schedule!r}.")

    def param_groups(self, name: str, params: Sequence[tuple[str, nn.Parameter]]) -> list[dict]:
        """A component's AdamW groups: weight matrices with decay, the rest without. Empty groups are dropped."""
        lr = self.lr_groups.get(name, self.lr)
        decay = [p for _, p in params if p.ndim >= 2]
        rest = [p for _, p in params if p.ndim < 2]
        groups = [
            {"name": name, "params": decay, "lr": lr, "initial_lr": lr, "weight_decay": self.weight_decay},
            {"name": f"{name}.no_decay", "params": rest, "lr": lr, "initial_lr": lr, "weight_decay": 0.0},
        ]
        return [g for g in groups if g["params"]]

    def build(self, groups: list[dict]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(groups, lr=self.lr, betas=tuple(self.betas), eps=self.eps, fused=self.fused or None)


class WarmupCosine(torch.optim.lr_scheduler.LRScheduler):
    """Linear warmup then cosine decay, applied to each group's own ``initial_lr``.

    Groups added later (a component unfrozen mid-run) follow the same curve from their own learning rate.

    >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    >>> sched = WarmupCosine(opt, warmup_steps=2, total_steps=10)
    >>> [round(WarmupCosine.factor(s, 2, 10, 0.1, "cosine"), 3) for s in (0, 1, 2, 10)]
    [0.0, 0.5, 1.0, 0.1]
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                 min_lr_ratio: float = 0.1, schedule: str = "cosine", last_epoch: int = -1):
        self.warmup_steps = warmup_steps
        self.total_steps = max(1, total_steps)
        self.min_lr_ratio = min_lr_ratio
        self.schedule = schedule
        super().__init__(optimizer, last_epoch)

    @staticmethod
    def factor(step: int, warmup: int, total: int, floor: float, schedule: str) -> float:
        if warmup and step < warmup:
            return step / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        f = self.factor(self.last_epoch, self.warmup_steps, self.total_steps, self.min_lr_ratio, self.schedule)
        return [group.setdefault("initial_lr", group["lr"]) * f for group in self.optimizer.param_groups]


def group_names(optimizer: torch.optim.Optimizer) -> list[str]:
    return [g.get("name", "") for g in optimizer.param_groups]


def components_in(optimizer: torch.optim.Optimizer) -> set[str]:
    """Components with at least one group in the optimizer."""
    return {name.removesuffix(".no_decay") for name in group_names(optimizer)}


def lr_of(optimizer: torch.optim.Optimizer) -> Mapping[str, float]:
    return {g["name"]: g["lr"] for g in optimizer.param_groups if "name" in g}
